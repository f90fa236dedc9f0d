"""Memory stays bounded: a failed, timed-out or cancelled request leaves a small record, never its body."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from testkit.gateway import (
    RunningGateway,
    chat_body,
    free_port,
    gateway_process_cwd,
    gateway_process_env,
    wait_until,
)
from testkit.upstream import FakeUpstream

MB = 1_000_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_failed_and_timed_out_requests_leave_no_body_behind(upstream: FakeUpstream) -> None:
    port = free_port()
    env = gateway_process_env(
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        PORT=str(port),
        MAX_CONCURRENT_REQUESTS="1",
        REQUEST_TIMEOUT="0.3",
        DEADLINE_ADMISSION="false",  # each must wait and time out, not be refused as hopeless on arrival
        UPSTREAM_MAX_RETRIES="0",
        BREAKER_FAILURE_THRESHOLD="0",
        LOG_LEVEL="error",
        # glibc serves blocks this large from mmap and returns them to the system once freed (by default it
        # raises the threshold as large blocks come and go, and keeps freed ones in its heap): RSS then counts
        # what the gateway keeps, not what its allocator holds on to.
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    server = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=gateway_process_cwd())
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        assert wait_until(lambda: _ready(port), timeout=30)

        def send(size: int, count: int, expect: int, parallel: int) -> None:
            body = chat_body("x" * size)
            with ThreadPoolExecutor(parallel) as pool:
                statuses = list(pool.map(lambda _: httpx.post(url, json=body, timeout=30).status_code, range(count)))
            assert statuses == [expect] * count

        def workload() -> None:
            upstream.behavior.hang, upstream.behavior.status = True, None
            send(4 * MB, 100, 408, 10)
            upstream.behavior.hang, upstream.behavior.status = False, 500
            send(1 * MB, 100, 502, 1)
            time.sleep(0.5)

        workload()  # once to warm up: imports, connections, the first history records
        before = rss_mb(server.pid)
        workload()
        grown = rss_mb(server.pid) - before
        print(f"RSS {before:.0f} MB -> {before + grown:.0f} MB")  # shown with pytest -s
        assert grown < 50, f"RSS grew {grown:.0f} MB over 100 x 4 MB timed out and 100 x 1 MB failed requests"
        status = httpx.get(f"http://127.0.0.1:{port}/v1/queue/status").json()
        assert status["total_timed_out"] == 200 and status["total_failed"] == 200
    finally:
        server.terminate()
        server.wait(15)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _frames_holding_bodies() -> list[str]:
    """The unreachable frames (cyclic garbage, found by a collection that keeps it) with a large local."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return [
        f"{item.f_code.co_qualname}.{name}"
        for item in garbage
        if isinstance(item, types.FrameType)
        for name, value in item.f_locals.items()
        if isinstance(value, bytes | str) and len(value) > 100_000
    ]


@pytest.mark.parametrize("ending", ["timed out at the backend", "timed out in the queue", "upstream 500"])
def test_an_ended_request_leaves_no_cycle_that_holds_its_body(
    upstream: FakeUpstream, start_gateway: Callable[..., RunningGateway], ending: str
) -> None:
    """A failed request's frames are freed when it ends, not at the next run of the cyclic collector (which may
    be long in coming while the gateway idles: RSS then counted the bodies of the last failures)."""
    gateway = start_gateway(
        MAX_CONCURRENT_REQUESTS=1,
        REQUEST_TIMEOUT=0.3,
        DEADLINE_ADMISSION=False,
        UPSTREAM_MAX_RETRIES=0,
        BREAKER_FAILURE_THRESHOLD=0,
    )
    url = gateway.url + "/v1/chat/completions"
    upstream.behavior.hang = ending != "upstream 500"
    upstream.behavior.status = 500 if ending == "upstream 500" else None
    gc.collect()
    gc.disable()
    try:
        body = chat_body("x" * (2 * MB))
        count = 2 if ending == "timed out in the queue" else 1  # the second waits behind the first, and times out
        with ThreadPoolExecutor(count) as pool:
            statuses = list(pool.map(lambda _: httpx.post(url, json=body, timeout=30).status_code, range(count)))
        assert statuses == [502 if ending == "upstream 500" else 408] * count
        assert wait_until(lambda: gateway.scheduler.in_flight == 0, timeout=5)
        assert gateway.call(_frames_holding_bodies) == []
    finally:
        gc.enable()
