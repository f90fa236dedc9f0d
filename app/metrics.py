"""Prometheus metrics on a registry passed in, so each app (and each test) has its own.

The request path only adds to plain integers and bucket arrays (prometheus_client's own Counter and
Histogram take a lock and scan buckets in Python, several microseconds per request); a collector turns them
into Prometheus families when the registry is scraped. Everything here runs on the event loop thread,
scrapes included, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        self._open_connections: Callable[[], int] | None = None
        self.rate_limit_waits = Buckets(WAIT_BUCKETS)
        self.token_counts = {"prompt": 0, "completion": 0}
        self._queue_sizes: Callable[[], Mapping[tuple[str, str], int]] = dict
        self._in_flight: Callable[[], int] = int
        self._backends_in_flight: Callable[[], Mapping[str, int]] = dict
        self._budget_remaining: Callable[[], Mapping[str, float]] = dict
        self._breaker_state: Callable[[], int] | None = None
        self._shared: Callable[[], SharedGauges] | None = None
        self.batch_lines = dict.fromkeys(BATCH_LINE_OUTCOMES, 0)
        self.webhook_deliveries = dict.fromkeys(WEBHOOK_OUTCOMES, 0)
        self._batches: Callable[[], Mapping[str, int]] | None = None
        self._webhooks_pending: Callable[[], int] | None = None
        self._prompt_tokens: Callable[[], Mapping[str, Mapping[str, int]]] = dict
        registry.register(_Exporter(self))

    def watch_queue(
        self,
        queue_sizes: Callable[[], Mapping[tuple[str, str], int]],
        in_flight: Callable[[], int],
        backends_in_flight: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        """Export the queue's live sizes by (model, priority), and what runs at each backend, read at each scrape."""
        self._queue_sizes = queue_sizes
        self._in_flight = in_flight
        self._backends_in_flight = backends_in_flight

    def backend(self, name: str) -> BackendSeries:
        """The series of the backend called `name` (names come from the configuration: the label is bounded)."""
        series = self.backends.get(name)
        if series is None:
            series = self.backends[name] = BackendSeries()
        return series

    def watch_prompt_tokens(self, by_backend: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Export the local models' prompt tokens by source (evaluated, reused), read at each scrape."""
        self._prompt_tokens = by_backend

    def watch_limits(
        self, budget_remaining: Callable[[], Mapping[str, float]], breaker_state: Callable[[], int] | None
    ) -> None:
        """Export the backend budgets' remainders and the breaker's state, read at each scrape."""
        self._budget_remaining = budget_remaining
        self._breaker_state = breaker_state

    def watch_replicas(self, shared: Callable[[], SharedGauges]) -> None:
        """Export the shared queue's state (REDIS_URL), read at each scrape."""
        self._shared = shared

    def watch_batches(self, statuses: Callable[[], Mapping[str, int]], webhooks_pending: Callable[[], int]) -> None:
        """Batches by status and webhook deliveries still to make, read at each scrape."""
        self._batches = statuses
        self._webhooks_pending = webhooks_pending

    def batch_line(self, outcome: str) -> None:
        """A batch line ended: answered 2xx (completed), answered otherwise (failed), or never (expired, cancelled)."""
        self.batch_lines[outcome] += 1

    def webhook_delivery(self, outcome: str) -> None:
        """A webhook attempt: delivered, failed and to be retried, or failed for good."""
        self.webhook_deliveries[outcome] += 1

    def watch_connections(self, open_connections: Callable[[], int]) -> None:
        """Export the number of open client connections, read at each scrape."""
        self._open_connections = open_connections

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


class _Exporter(Collector):
    """Turns Metrics' plain numbers into Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics):
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._m
        sizes = GaugeMetricFamily(
            "gateway_queue_size",
            "Requests waiting in the queue, by model pool ('*': any model) and priority.",
            labels=["model", "priority"],
        )
        for (model, priority), size in m._queue_sizes().items():
            sizes.add_metric([model, priority], size)
        yield sizes
        yield GaugeMetricFamily("gateway_requests_in_flight", "Requests at the backends now.", value=m._in_flight())

        yield _histogram(
            "gateway_queue_wait_seconds",
            "Time from arrival to dispatch to a backend, by model pool and priority.",
            ["model", "priority"],
            {(model, p.value): series for (model, p), series in m.waits.items()},
        )
        in_flight = GaugeMetricFamily(
            "gateway_backend_in_flight",
            "Slots busy at each backend now (a request of n choices at the local model holds n).",
            labels=["backend"],
        )
        for name, count in m._backends_in_flight().items():
            in_flight.add_metric([name], count)
        yield in_flight
        for attribute, name, documentation in (
            ("dispatched", "gateway_backend_dispatched", "Requests dispatched to each backend."),
            ("errors", "gateway_backend_errors", "Requests that failed at each backend."),
            ("failovers", "gateway_backend_retries", "Requests that failed at a backend and went on to another."),
        ):
            yield _counter(name, documentation, "backend", {b: getattr(s, attribute) for b, s in m.backends.items()})
        yield _histogram(
            "gateway_backend_latency_seconds",
            "Seconds a completed request held its slot at each backend.",
            ["backend"],
            {(b,): s.latency for b, s in m.backends.items()},
        )
        yield _histogram(
            "gateway_request_duration_seconds",
            "Time from arrival to the end of the response, by priority and outcome.",
            ["priority", "outcome"],
            {(p.value, o): series for (p, o), series in m.durations.items()},
        )

        requests = CounterMetricFamily(
            "gateway_requests",
            "Requests by priority and outcome (completed, failed, rejected, timeout, cancelled).",
            labels=["priority", "outcome"],
        )
        for (priority, outcome), count in m.requests.items():
            requests.add_metric([priority.value, outcome], count)
        yield requests

        yield _counter("gateway_upstream_errors", "Upstream failures by kind.", "kind", m.upstream_errors)

        yield _counter("gateway_rejections", "Requests refused before queueing, by reason.", "reason", m.rejections)
        yield _counter(
            "gateway_tokens", "Tokens of answered requests, as their usage reported them.", "kind", m.token_counts
        )
        prompt_tokens = CounterMetricFamily(
            "gateway_prompt_tokens",
            "Prompt tokens at each local model, by source: evaluated by the model, or reused from the KV cells a "
            "slot held (a shared prefix, a request's first choice).",
            labels=["backend", "source"],
        )
        for backend, counts in m._prompt_tokens().items():
            for source, count in counts.items():
                prompt_tokens.add_metric([backend, source], count)
        yield prompt_tokens
        yield _counter(
            "gateway_connections_closed",
            "Client connections the gateway closed because a connection limit bit, by reason.",
            "reason",
            m.connections_closed,
        )
        if m._open_connections is not None:
            yield GaugeMetricFamily(
                "gateway_connections_open", "Client connections open now.", value=m._open_connections()
            )
        yield CounterMetricFamily(
            "gateway_timeouts_before_dispatch",
            "Waiting requests answered 408 instead of dispatched, with too little time left (DISPATCH_MARGIN).",
            value=m.too_late,
        )
        yield _counter(
            "gateway_preemptions",
            "Running requests parked to give their slot to a high-priority one (PREEMPTION), by their priority.",
            "priority",
            m.preemptions,
        )
        yield _counter("gateway_upstream_retries", "Upstream attempts retried, by reason.", "reason", m.retries)
        yield _histogram(
            "gateway_rate_limit_wait_seconds",
            "Time the queue's head was held back by the rate budgets or the circuit breaker.",
            [],
            {(): m.rate_limit_waits},
        )
        remaining = GaugeMetricFamily(
            "gateway_rate_limit_remaining",
            "What is left of the backend's RATE_LIMIT_RPM / RATE_LIMIT_TPM budgets.",
            labels=["budget"],
        )
        for budget, value in m._budget_remaining().items():
            remaining.add_metric([budget], value)
        yield remaining
        if m._shared is not None:
            yield from _shared_families(m._shared())
        if m._batches is not None:
            batches = GaugeMetricFamily("gateway_batches", "Batches by status.", labels=["status"])
            for status, count in m._batches().items():
                batches.add_metric([status], count)
            yield batches
            yield _counter("gateway_batch_lines", "Batch lines ended, by outcome.", "outcome", m.batch_lines)
        if m._webhooks_pending is not None:
            yield _counter(
                "gateway_webhook_deliveries", "Webhook delivery attempts, by outcome.", "outcome", m.webhook_deliveries
            )
            yield GaugeMetricFamily(
                "gateway_webhook_deliveries_pending", "Webhook events not delivered yet.", value=m._webhooks_pending()
            )
        if m._breaker_state is not None:
            yield GaugeMetricFamily(
                "gateway_circuit_breaker_state",
                "The upstream circuit breaker: 0 closed, 1 half open, 2 open.",
                value=m._breaker_state(),
            )


def _shared_families(shared: SharedGauges) -> Iterable[Metric]:
    """The shared queue's families. The global ones carry scope="global": every replica exports the same
    numbers, so dashboards read them with max(), never sum() (docs/replicas.md)."""
    yield GaugeMetricFamily("gateway_coordination_up", "1 while Redis (REDIS_URL) answers, else 0.", value=shared.up)
    yield GaugeMetricFamily(
        "gateway_coordination_local",
        "1 while this replica serves alone from its own queue (REDIS_FAILURE_MODE=local, Redis out of reach).",
        value=shared.local,
    )
    yield CounterMetricFamily(
        "gateway_coordination_losses",
        "Times this replica lost Redis (and answered or served as REDIS_FAILURE_MODE says).",
        value=shared.losses,
    )
    if shared.waiting is not None:
        sizes = GaugeMetricFamily(
            "gateway_global_queue_size",
            "Requests waiting on all replicas, by model pool and priority (read with max()).",
            labels=["model", "priority", "scope"],
        )
        for model, counts in shared.waiting.items():
            for p in Priority:
                sizes.add_metric([model, p.value, "global"], counts[p.rank])
        yield sizes
    if shared.running is not None:
        running = GaugeMetricFamily(
            "gateway_global_backend_in_flight",
            "Requests running at each shared backend from all replicas (read with max()).",
            labels=["backend", "scope"],
        )
        for name, count in shared.running.items():
            running.add_metric([name, "global"], count)
        yield running
    if shared.replicas is not None:
        family = GaugeMetricFamily("gateway_replicas", "Live replicas sharing the queue.", labels=["scope"])
        family.add_metric(["global"], shared.replicas)
        yield family


def _counter(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _histogram(
    name: str, documentation: str, labels: list[str], series: dict[tuple[str, ...], Buckets]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, buckets in series.items():
        family.add_metric(list(values), buckets.cumulative(), buckets.total)
    return family
