"""An upstream's SSE stream relayed in whole events, and the usage an OpenAI answer reports."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Callable

import aiohttp
import orjson

from app.backends.base import BackendStream, Usage

# A stream's last chunks, kept by reference (no copying) to find its usage event once it ends: the usage
# event is the last before [DONE], a few hundred bytes, so it lies within these however the chunks fall.
_USAGE_TAIL_CHUNKS = 8
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")  # how an SSE event ends


class UpstreamStream(BackendStream):
    """The upstream's SSE bytes as they arrive, in whole events; its usage from the last event that has one.

    A read that fails raises what `failure` makes of it (the backend counts it and names it for the client).
    """

    __slots__ = ("_failure", "_response")

    def __init__(self, response: aiohttp.ClientResponse, failure: Callable[[BaseException], Exception]):
        self._response = response
        self._failure = failure
        super().__init__()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        """Whole SSE events as they arrive: a partial event waits for its end, so an error event that follows
        a timeout or a broken connection always starts on a line of its own."""
        response = self._response
        tail: deque[bytes] = deque(maxlen=_USAGE_TAIL_CHUNKS)
        partial = b""
        complete = False
        try:
            async for data in response.content.iter_any():
                chunk = partial + data if partial else data
                if chunk.endswith(_EVENT_ENDS):
                    partial = b""
                else:
                    cut = max((at + len(end) for end in _EVENT_ENDS if (at := chunk.rfind(end)) >= 0), default=0)
                    if not cut:
                        partial = chunk
                        continue
                    chunk, partial = chunk[:cut], chunk[cut:]
                yield chunk
                tail.append(chunk)
            if partial:
                yield partial  # the upstream ended in the middle of an event: pass on what it sent
            complete = True
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc) from exc
        finally:
            if complete:
                response.release()  # back to the pool for the next request
            else:
                response.close()  # stop the upstream's work: the client is gone or the request was aborted
        self.usage = _stream_usage(b"".join(tail))


def usage_of(answer: object) -> Usage | None:
    """A parsed completion's usage, if it reports one."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def _stream_usage(tail: bytes) -> Usage | None:
    """The usage of the last SSE event that carries one (stream_options.include_usage)."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"data:", 0, at)
    end = tail.find(b"\n", at)
    if start < 0:
        return None
    try:
        return usage_of(orjson.loads(tail[start + 5 : end if end >= 0 else len(tail)]))
    except orjson.JSONDecodeError:
        return None
