"""Stop strings over a token stream: text safe to send now, held back while it could still become a stop."""

from __future__ import annotations

import codecs


class StopText:
    """Turns token bytes into text deltas, holding back what could still become a stop string.

    >>> text = StopText(("###",))
    >>> text.feed(b"Hello #"), text.feed(b"## more")
    (('Hello ', False), ('', True))
    """

    __slots__ = ("_decoder", "_pending", "_stops")

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string was reached (its text is never sent)."""
        self._pending += self._decoder.decode(data)
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending, False
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:size]):
                    hold = size
                    break
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Whatever is left once generation ends without a stop string."""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return rest
