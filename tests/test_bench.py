"""The benchmarks stay runnable: each imports (they run by hand, not in CI) and reads its arguments."""

from __future__ import annotations

import importlib

import pytest

from bench.replicas_bench import GrantAudit


@pytest.mark.parametrize(
    "name",
    [
        "proxy_bench",
        "local_bench",
        "limits_bench",
        "scheduler_bench",
        "bare_proxy",
        "connections_bench",
        "overload_bench",
        "deadline_bench",
        "fleet_bench",
        "eta_bench",
        "replicas_bench",
        "batch_bench",
    ],
)
def test_a_benchmark_module_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert hasattr(module, "main") or hasattr(module, "app")


def test_the_replicas_audit_counts_a_grant_made_while_a_higher_ticket_waited() -> None:
    audit = GrantAudit(port=1)  # not started: it is fed lines as MONITOR would show them
    for line in (
        "ZADD p:q:m 21000000000000 t-low",
        "ZADD p:q:m 1000000000000 t-high",
        "ZREM p:q:m t-high",
        "ZADD p:l:a 99 t-high",  # the high one first: in order
        "ZADD p:q:m 1000000000001 t-high2",
        "ZREM p:q:m t-low",
        "ZADD p:l:a 99 t-low",  # a low one while a high one waits: an inversion
        "ZADD p:l:a XX CH 99 t-high",  # a renewal, not a grant
    ):
        audit._see(line.split(" "))
    assert (audit.grants, audit.inversions) == (2, 1)
