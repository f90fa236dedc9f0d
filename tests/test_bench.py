"""The benchmarks stay runnable: each imports (they run by hand, not in CI) and reads its arguments."""

from __future__ import annotations

import argparse
import importlib
import random
import signal
import sys
from collections.abc import Callable

import pytest

from bench.cpu_sampler import Sampler
from bench.eta_sim import covered, future_wait, least_error, simulate
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
        "cpu_sampler",
    ],
)
def test_a_benchmark_module_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert hasattr(module, "main") or hasattr(module, "app")


def _gateway_function(module: str, path: str, name: str, body: str) -> Callable[..., None]:
    """A function of the gateway's module `module` (file `path`), as the gateway's own are."""
    scope: dict[str, object] = {"__name__": module, "signal": signal, "sys": sys}
    exec(compile(f"def {name}(sample, then):\n    {body}\n", path, "exec"), scope)
    function = scope[name]
    assert callable(function)
    return function


def test_the_cpu_sampler_counts_a_sample_for_its_innermost_gateway_frame() -> None:
    sampler = Sampler({("app/queue/scheduler.py", "submit")})
    sample_here = "sample(signal.SIGPROF, sys._getframe())"
    observe = _gateway_function("app.metrics", "/srv/app/metrics.py", "observe", sample_here)
    submit = _gateway_function("app.queue.scheduler", "/srv/app/queue/scheduler.py", "submit", "then(sample, None)")
    # Not the gateway's, whatever its path says: a virtual environment under a directory named app.
    library = _gateway_function("aiohttp.client", "/app/.venv/aiohttp/client.py", "post", "then(sample, None)")

    submit(sampler.sample, lambda sample, then: library(sample, observe))
    observe(sampler.sample, None)  # not under submit
    library(sampler.sample, lambda sample, then: sample(signal.SIGPROF, sys._getframe()))  # no gateway frame
    assert sampler.files == {"app/metrics.py": 2, "-": 1}
    assert sampler.functions == {"app/metrics.py:observe": 2}
    assert sampler.inclusive == 1


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
    args.futures, args.bound_every = 20, 50
    rows, futures = await simulate(args)
    assert len(rows) > 500  # at 85 % of 4 slots, most requests queue
    assert all(estimate > 0 and naive > 0 and wait >= 0 for _, estimate, naive, wait in rows)
    assert {row[0].value for row in rows} == {"high", "normal", "low"}
    assert len(futures) > 10 and all(waits == sorted(waits) and waits[0] >= 0.001 for _, waits in futures)
    assert 0.0 < least_error([waits for _, waits in futures], 0.5) < least_error([w for _, w in futures], 0.9)


def test_the_eta_bound_counts_what_one_estimate_can_fall_near() -> None:
    assert covered([1.0, 1.0, 1.0], 0.01) == 1.0
    assert covered([1.0, 3.0], 0.5) == 1.0  # an estimate of 1.5 is within 50 % of both
    assert covered([1.0, 3.0], 0.4) == 0.5
    assert covered([1.0, 100.0], 1.0) == 1.0  # an estimate of 0 is 100 % off every wait
    # Half the requests certain to wait 1 s, half spread over 1-1000 s: the median error is 0, the p90 is not.
    futures = [[1.0] * 10] * 5 + [[10.0**k for k in range(4)]] * 5
    assert least_error(futures, 0.5) < 0.001
    assert least_error(futures, 0.9) > 0.8


def test_a_drawn_future_serves_strict_priority_in_order() -> None:
    rng = random.Random(1)
    almost_done = [(8, 0.299)] * 4  # four busy slots about to free (service times are 0.1-0.3 s)
    for _ in range(50):
        assert future_wait(rng, almost_done, [[]], 0, 1e-9, sized=False) <= 0.001
        # Four ahead at its own level take the four slots; its own frees 0.1-0.3 s later.
        assert 0.1 <= future_wait(rng, almost_done, [[8], [8, 8, 8]], 1, 1e-9, sized=False) <= 0.301
