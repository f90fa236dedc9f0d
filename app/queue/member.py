"""A member of the fleet as the queue sees it: a backend with its own slots, budgets, breaker and latency."""

from __future__ import annotations

from typing import Any

from app.errors import UpstreamError
from app.limits.breaker import BreakerState
from app.metrics import BackendSeries
from app.queue.gate import DispatchGate
from app.queue.slots import SlotPool

# Weight of the newest request in a member's latency average: about the last ten count.
_LATENCY_WEIGHT = 0.1


class Member:
    """One backend behind the queue. The scheduler changes its slots; the fleet its health and models.

    `models` is None for a member that serves any model name (the fleet of one the settings describe), else
    the names it serves; `retiring` is set once a reload removed it: it takes no new work and is closed when
    its last request ends.
    """

    __slots__ = (
        "backend",
        "base_url",
        "gate",
        "kind",
        "latency",
        "max_concurrent",
        "models",
        "name",
        "parked",
        "parking",
        "reserved_high",
        "retiring",
        "series",
        "slots",
        "withheld",
    )

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        *,
        backend: Any = None,
        kind: str = "proxy",
        models: tuple[str, ...] | None = None,
        gate: DispatchGate | None = None,
        base_url: str | None = None,
        series: BackendSeries | None = None,
        reserved_high: int = 0,
        parking: int = 0,
    ):
        self.name = name
        self.kind = kind  # 'proxy' or 'local'
        self.backend = backend
        self.base_url = base_url  # without credentials, for status
        self.max_concurrent = max_concurrent
        self.models = models
        self.gate = gate
        self.slots = SlotPool(max_concurrent)
        self.reserved_high = reserved_high  # slots only high-priority requests may take (RESERVED_HIGH_SLOTS)
        self.parking = parking  # requests it may hold parked at once (preemption; 0: it cannot pause them)
        self.parked = 0  # requests parked here now, waiting to resume
        # Slots this replica leaves to the others while it serves alone (REDIS_FAILURE_MODE=local).
        self.withheld = 0
        self.latency: float | None = None  # moving average of completed requests' seconds at this member
        self.retiring = False
        self.series = series if series is not None else BackendSeries()  # its metrics, kept by name

    def takes(self, rank: int, count: int = 1) -> bool:
        """Whether a request of level `rank` may take `count` of its idle slots (the reserved ones are for high)."""
        idle = len(self.slots.idle) - self.withheld
        return idle >= self.reserved_high + count if rank else idle >= count

    def slots_for(self, choices: int) -> int:
        """The slots a request of `choices` choices (n) takes here: one per choice at the local model, which
        decodes them side by side; one at a proxy, whose upstream answers them all in one request."""
        return choices if self.kind == "local" else 1

    def could_take(self, rank: int, choices: int) -> bool:
        """Whether a request of level `rank` and `choices` choices fits here at all, every slot idle."""
        return self.max_concurrent - (self.reserved_high if rank else 0) >= self.slots_for(choices)

    @property
    def holds_work(self) -> bool:
        """Whether requests run here or wait parked here (a retiring member is closed only once neither)."""
        return bool(self.slots.busy or self.parked)

    @property
    def in_flight(self) -> int:
        return self.slots.busy

    @property
    def load(self) -> float:
        """In flight ÷ max_concurrent: what least-loaded routing compares."""
        return self.slots.busy / self.max_concurrent

    @property
    def down(self) -> bool:
        """Whether its breaker is open: it takes nothing until a probe or its cooldown lets it back."""
        gate = self.gate
        return gate is not None and gate.breaker is not None and gate.breaker.state is BreakerState.OPEN

    @property
    def counts_tokens(self) -> bool:
        """Whether it has a token budget (TPM), for which requests need a token estimate."""
        gate = self.gate
        return gate is not None and gate.limiter is not None and gate.limiter.counts_tokens

    def observe(self, seconds: float) -> None:
        """A request completed here after `seconds`."""
        latency = self.latency
        self.latency = seconds if latency is None else latency + _LATENCY_WEIGHT * (seconds - latency)

    def failed(self, error: Exception) -> None:
        """A request failed here before its client saw a byte, and its pool has other members.

        A connection that cannot be made means the server is gone: the member is marked down at once rather
        than after a run of failures, and its work goes to the others. (A connection that broke off counts as a
        failure only: servers close kept-alive connections of their own accord.)
        """
        gate = self.gate
        if gate is None or gate.breaker is None or not isinstance(error, UpstreamError):
            return
        if error.kind == "connect":
            gate.breaker.trip()
