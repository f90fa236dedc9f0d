"""The benchmarks stay runnable: each imports (they run by hand, not in CI) and reads its arguments."""

from __future__ import annotations

import argparse
import importlib

import pytest

from bench.eta_sim import simulate
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
        "eta_sim",
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


@pytest.mark.anyio
async def test_the_eta_simulation_drives_the_real_scheduler_to_the_end() -> None:
    args = argparse.Namespace(requests=2000, load=0.85, sized=True, seed=3)
    rows = await simulate(args)
    assert len(rows) > 500  # at 85 % of 4 slots, most requests queue
    assert all(estimate > 0 and naive > 0 and wait >= 0 for _, estimate, naive, wait in rows)
    assert {row[0].value for row in rows} == {"high", "normal", "low"}
