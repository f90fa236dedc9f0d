"""The benchmarks stay runnable: each imports (they run by hand, not in CI) and reads its arguments."""

from __future__ import annotations

import importlib

import pytest


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
    ],
)
def test_a_benchmark_module_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert hasattr(module, "main") or hasattr(module, "app")
