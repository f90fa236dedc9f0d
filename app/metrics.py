"""Prometheus metrics on a registry passed in, so each app (and each test) has its own.

Label children are bound once here: the request path calls plain methods and never looks labels up.
Queue depth and requests in flight are read from the scheduler when Prometheus scrapes, not kept in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.settings import Priority

OUTCOMES = ("completed", "failed", "rejected", "timeout", "cancelled")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "http_5xx", "protocol")

# Queue waits run from microseconds (idle) to minutes (saturated); durations likewise.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _LiveGauges(Collector):
    """Reads queue sizes and in-flight count from callables at scrape time."""

    def __init__(self, queue_sizes: Callable[[], Mapping[str, int]], in_flight: Callable[[], int]):
        self._queue_sizes = queue_sizes
        self._in_flight = in_flight

    def collect(self) -> Iterable[Metric]:
        sizes = GaugeMetricFamily(
            "gateway_queue_size", "Requests waiting in the queue, by priority.", labels=["priority"]
        )
        for priority, size in self._queue_sizes().items():
            sizes.add_metric([priority], size)
        yield sizes
        yield GaugeMetricFamily("gateway_requests_in_flight", "Requests at the backend now.", value=self._in_flight())


class Metrics:
    """The gateway's metrics, all named gateway_<noun>_<unit>."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time from arrival to dispatch to the backend, by priority.",
            ["priority"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from arrival to the end of the response, by priority and outcome.",
            ["priority", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        requests = Counter(
            "gateway_requests",
            "Requests by priority and outcome (completed, failed, rejected, timeout, cancelled).",
            ["priority", "outcome"],
            registry=registry,
        )
        upstream_errors = Counter("gateway_upstream_errors", "Upstream failures by kind.", ["kind"], registry=registry)
        self._wait = {p: wait.labels(p.value) for p in Priority}
        self._duration = {(p, o): duration.labels(p.value, o) for p in Priority for o in OUTCOMES}
        self._requests = {(p, o): requests.labels(p.value, o) for p in Priority for o in OUTCOMES}
        self._upstream_errors = {k: upstream_errors.labels(k) for k in UPSTREAM_ERROR_KINDS}

    def watch_queue(self, queue_sizes: Callable[[], Mapping[str, int]], in_flight: Callable[[], int]) -> None:
        """Export the queue's live sizes, read at each scrape."""
        self.registry.register(_LiveGauges(queue_sizes, in_flight))

    def dispatched(self, priority: Priority, waited: float) -> None:
        """A request left the queue for the backend after waiting `waited` seconds."""
        self._wait[priority].observe(waited)

    def finished(self, priority: Priority, outcome: str, duration: float | None) -> None:
        """A request ended; rejected ones have no duration."""
        self._requests[priority, outcome].inc()
        if duration is not None:
            self._duration[priority, outcome].observe(duration)

    def upstream_error(self, kind: str) -> None:
        """The upstream failed in one of UPSTREAM_ERROR_KINDS."""
        self._upstream_errors[kind].inc()
