"""Memory stays bounded: a failed, timed-out or cancelled request leaves a small record, never its body."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from testkit.gateway import chat_body, free_port, gateway_process_cwd, gateway_process_env, wait_until
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
