"""Prometheus metrics on a registry passed in, so each app (and each test) has its own.

The request path only adds to plain integers and bucket arrays (prometheus_client's own Counter and
Histogram take a lock and scan buckets in Python, several microseconds per request); a collector turns them
into Prometheus families when the registry is scraped (app.exposition). Everything here runs on the event loop
thread, scrapes included, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from app.exposition import Exporter
from app.types import Priority


class SharedGauges:
    """What a replica reports of the shared queue (REDIS_URL) at a scrape."""

    __slots__ = ("local", "losses", "replicas", "running", "up", "waiting")

    def __init__(
        self,
        up: bool,
        local: bool,
        losses: int,
        waiting: Mapping[str, list[int]] | None = None,
        running: Mapping[str, int] | None = None,
        replicas: int | None = None,
    ):
        self.up = up
        self.local = local
        self.losses = losses
        self.waiting = waiting  # by model pool, counts by level: all replicas' (None: not known now)
        self.running = running  # by backend: all replicas'
        self.replicas = replicas


OUTCOMES = ("completed", "failed", "rejected", "timeout", "cancelled")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "http_5xx", "protocol")
REJECTION_REASONS = (
    "queue_full",
    "key_rate_limit",
    "key_queue_limit",
    "breaker_open",
    "shutting_down",
    "deadline_unreachable",
    "coordination_unavailable",
    "duplicate_request_id",
)
CONNECTION_LIMITS = ("headers_too_large", "header_timeout", "body_timeout", "too_many_connections", "idle_evicted")
BATCH_LINE_OUTCOMES = ("completed", "failed", "expired", "cancelled")
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed")
RETRY_REASONS = ("http_429", "http_502", "http_503", "http_504", "connect", "timeout", "protocol")

# Queue waits run from microseconds (idle) to minutes (saturated); durations likewise.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Buckets:
    """One histogram series: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "labels", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.labels: tuple[str, ...] = tuple(floatToGoString(b) for b in (*bounds, float("inf")))  # type: ignore[no-untyped-call]
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' `le`
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count of observations <= le) pairs, as the exposition format wants them."""
        pairs = []
        running = 0
        for label, count in zip(self.labels, self.counts, strict=True):
            running += count
            pairs.append((label, float(running)))
        return pairs


class BackendSeries:
    """One backend's counters and latency, kept by name: a member replaced by a reload goes on counting."""

    __slots__ = ("dispatched", "errors", "failovers", "latency")

    def __init__(self) -> None:
        self.dispatched = 0
        self.errors = 0  # requests that failed there
        self.failovers = 0  # of those, the ones tried again on another member
        self.latency = Buckets(DURATION_BUCKETS)  # seconds a completed request held a slot there


class Metrics:
    """The gateway's metrics, all named gateway_<noun>_<unit>; see the README's table."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.waits: dict[tuple[str, Priority], Buckets] = {}  # by (model pool, priority), made on first use
        self.backends: dict[str, BackendSeries] = {}
        self.durations = {(p, o): Buckets(DURATION_BUCKETS) for p in Priority for o in OUTCOMES}
        self.requests = {(p, o): 0 for p in Priority for o in OUTCOMES}
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.rejections = dict.fromkeys(REJECTION_REASONS, 0)
        self.retries = dict.fromkeys(RETRY_REASONS, 0)
        self.connections_closed = dict.fromkeys(CONNECTION_LIMITS, 0)
        self.too_late = 0
        self.preemptions = {p.value: 0 for p in Priority}  # by the priority of the request parked
        self.read_open_connections: Callable[[], int] | None = None
        self.rate_limit_waits = Buckets(WAIT_BUCKETS)
        self.token_counts = {"prompt": 0, "completion": 0}
        self.read_queue_sizes: Callable[[], Mapping[tuple[str, str], int]] = dict
        self.read_in_flight: Callable[[], int] = int
        self.read_backends_in_flight: Callable[[], Mapping[str, int]] = dict
        self.read_budget_remaining: Callable[[], Mapping[str, float]] = dict
        self.read_breaker_state: Callable[[], int] | None = None
        self.read_shared: Callable[[], SharedGauges] | None = None
        self.batch_lines = dict.fromkeys(BATCH_LINE_OUTCOMES, 0)
        self.webhook_deliveries = dict.fromkeys(WEBHOOK_OUTCOMES, 0)
        self.read_batches: Callable[[], Mapping[str, int]] | None = None
        self.read_webhooks_pending: Callable[[], int] | None = None
        self.read_prompt_tokens: Callable[[], Mapping[str, Mapping[str, int]]] = dict
        registry.register(Exporter(self))

    def watch_queue(
        self,
        queue_sizes: Callable[[], Mapping[tuple[str, str], int]],
        in_flight: Callable[[], int],
        backends_in_flight: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        """Export the queue's live sizes by (model, priority), and what runs at each backend, read at each scrape."""
        self.read_queue_sizes = queue_sizes
        self.read_in_flight = in_flight
        self.read_backends_in_flight = backends_in_flight

    def backend(self, name: str) -> BackendSeries:
        """The series of the backend called `name` (names come from the configuration: the label is bounded)."""
        series = self.backends.get(name)
        if series is None:
            series = self.backends[name] = BackendSeries()
        return series

    def watch_prompt_tokens(self, by_backend: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Export the local models' prompt tokens by source (evaluated, reused), read at each scrape."""
        self.read_prompt_tokens = by_backend

    def watch_limits(
        self, budget_remaining: Callable[[], Mapping[str, float]], breaker_state: Callable[[], int] | None
    ) -> None:
        """Export the backend budgets' remainders and the breaker's state, read at each scrape."""
        self.read_budget_remaining = budget_remaining
        self.read_breaker_state = breaker_state

    def watch_replicas(self, shared: Callable[[], SharedGauges]) -> None:
        """Export the shared queue's state (REDIS_URL), read at each scrape."""
        self.read_shared = shared

    def watch_batches(self, statuses: Callable[[], Mapping[str, int]], webhooks_pending: Callable[[], int]) -> None:
        """Batches by status and webhook deliveries still to make, read at each scrape."""
        self.read_batches = statuses
        self.read_webhooks_pending = webhooks_pending

    def batch_line(self, outcome: str) -> None:
        """A batch line ended: answered 2xx (completed), answered otherwise (failed), or never (expired, cancelled)."""
        self.batch_lines[outcome] += 1

    def webhook_delivery(self, outcome: str) -> None:
        """A webhook attempt: delivered, failed and to be retried, or failed for good."""
        self.webhook_deliveries[outcome] += 1

    def watch_connections(self, open_connections: Callable[[], int]) -> None:
        """Export the number of open client connections, read at each scrape."""
        self.read_open_connections = open_connections

    def connection_closed(self, reason: str) -> None:
        """A connection limit closed a client connection, for one of CONNECTION_LIMITS."""
        self.connections_closed[reason] += 1

    def timed_out_before_dispatch(self) -> None:
        """A waiting request was answered 408 instead of dispatched: too little of its time was left."""
        self.too_late += 1

    def preempted(self, priority: Priority) -> None:
        """A running request of `priority` was parked to give its slot to a high-priority one."""
        self.preemptions[priority.value] += 1

    def rejected(self, reason: str) -> None:
        """A request was refused before it was queued, for one of REJECTION_REASONS."""
        self.rejections[reason] += 1

    def rate_limit_wait(self, seconds: float) -> None:
        """The queue's head waited `seconds` for the rate budgets (or the breaker) to let it go."""
        self.rate_limit_waits.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        """A response reported its usage."""
        self.token_counts["prompt"] += prompt
        self.token_counts["completion"] += completion

    def retried(self, reason: str) -> None:
        """An upstream attempt failed for one of RETRY_REASONS and is tried again."""
        self.retries[reason] += 1

    def dispatched(self, model: str, priority: Priority, waited: float) -> None:
        """A request of `model`'s pool left the queue for a backend after waiting `waited` seconds."""
        series = self.waits.get((model, priority))
        if series is None:
            series = self.waits[model, priority] = Buckets(WAIT_BUCKETS)
        series.observe(waited)

    def finished(self, priority: Priority, outcome: str, duration: float | None) -> None:
        """A request ended; rejected ones have no duration."""
        self.requests[priority, outcome] += 1
        if duration is not None:
            self.durations[priority, outcome].observe(duration)

    def upstream_error(self, kind: str) -> None:
        """The upstream failed in one of UPSTREAM_ERROR_KINDS."""
        self.upstream_errors[kind] += 1
