"""The gateway's metrics as Prometheus families, made from app.metrics' plain numbers when the registry is
scraped (on the event loop thread, as everything that writes those numbers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.types import Priority

if TYPE_CHECKING:
    from app.metrics import Buckets, Metrics, SharedGauges


class Exporter(Collector):
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
        for (model, priority), size in m.read_queue_sizes().items():
            sizes.add_metric([model, priority], size)
        yield sizes
        yield GaugeMetricFamily("gateway_requests_in_flight", "Requests at the backends now.", value=m.read_in_flight())

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
        for name, count in m.read_backends_in_flight().items():
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
        for backend, counts in m.read_prompt_tokens().items():
            for source, count in counts.items():
                prompt_tokens.add_metric([backend, source], count)
        yield prompt_tokens
        yield _counter(
            "gateway_connections_closed",
            "Client connections the gateway closed because a connection limit bit, by reason.",
            "reason",
            m.connections_closed,
        )
        if m.read_open_connections is not None:
            yield GaugeMetricFamily(
                "gateway_connections_open", "Client connections open now.", value=m.read_open_connections()
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
        for budget, value in m.read_budget_remaining().items():
            remaining.add_metric([budget], value)
        yield remaining
        if m.read_shared is not None:
            yield from _shared_families(m.read_shared())
        if m.read_batches is not None:
            batches = GaugeMetricFamily("gateway_batches", "Batches by status.", labels=["status"])
            for status, count in m.read_batches().items():
                batches.add_metric([status], count)
            yield batches
            yield _counter("gateway_batch_lines", "Batch lines ended, by outcome.", "outcome", m.batch_lines)
        if m.read_webhooks_pending is not None:
            yield _counter(
                "gateway_webhook_deliveries", "Webhook delivery attempts, by outcome.", "outcome", m.webhook_deliveries
            )
            yield GaugeMetricFamily(
                "gateway_webhook_deliveries_pending",
                "Webhook events not delivered yet.",
                value=m.read_webhooks_pending(),
            )
        if m.read_breaker_state is not None:
            yield GaugeMetricFamily(
                "gateway_circuit_breaker_state",
                "The upstream circuit breaker: 0 closed, 1 half open, 2 open.",
                value=m.read_breaker_state(),
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
