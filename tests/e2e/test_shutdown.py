"""SIGTERM on a real server process: running requests finish, waiting ones get 503, nothing is cut off."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fakes.upstream import FakeUpstream
from tests.harness import Background, chat_body, wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sigterm_drains(upstream: FakeUpstream) -> None:
    port = free_port()
    env = {
        **os.environ,
        "BACKEND": "proxy",
        "UPSTREAM_BASE_URL": upstream.base_url,
        "PORT": str(port),
        "MAX_CONCURRENT_REQUESTS": "2",
        "DRAIN_TIMEOUT": "10",
        "LOG_LEVEL": "warning",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "app"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    background = Background()
    try:
        assert wait_until(lambda: _answers(url + "/health"), timeout=20)
        upstream.behavior.latency = 1.0
        running = [background.post(url + "/v1/chat/completions", chat_body(f"run{i}")) for i in range(2)]
        assert upstream.wait_for(lambda: upstream.active == 2)
        waiting = [background.post(url + "/v1/chat/completions", chat_body(f"wait{i}")) for i in range(3)]
        assert wait_until(lambda: httpx.get(url + "/v1/queue/status").json()["queue_size"] == 3)

        server.send_signal(signal.SIGTERM)
        for future in waiting:
            response = future.result()
            assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        for future in running:
            response = future.result()
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"].startswith("echo: run")
        server.wait(timeout=15)
        assert not _answers(url + "/health")  # no longer accepting
    finally:
        background.close()
        if server.poll() is None:
            server.kill()
        output = server.stdout.read().decode() if server.stdout else ""
    assert "Traceback" not in output, output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
