"""SIGTERM on a real server process: running requests finish, waiting ones get 503, nothing is cut off."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx

from testkit.gateway import (
    Background,
    chat_body,
    free_port,
    gateway_process_cwd,
    gateway_process_env,
    wait_until,
)
from testkit.upstream import FakeUpstream


def start_server(
    upstream: FakeUpstream, concurrency: int, drain_timeout: float = 10
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = gateway_process_env(
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        PORT=str(port),
        MAX_CONCURRENT_REQUESTS=str(concurrency),
        DRAIN_TIMEOUT=str(drain_timeout),
        LOG_LEVEL="warning",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "app"],
        env=env,
        cwd=gateway_process_cwd(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return server, f"http://127.0.0.1:{port}"


def reap(server: subprocess.Popen[bytes]) -> str:
    """Kill the server if it still runs; everything it printed."""
    if server.poll() is None:
        server.kill()
    return server.stdout.read().decode() if server.stdout else ""


def test_sigterm_drains(upstream: FakeUpstream) -> None:
    server, url = start_server(upstream, concurrency=2)
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
        # A drain is the expected way to stop: exit 0, not death by the signal (`make serve` said "Terminated").
        assert server.wait(timeout=15) == 0
        assert not _answers(url + "/health")  # no longer accepting
    finally:
        background.close()
        output = reap(server)
    assert "Traceback" not in output, output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_under_load_every_request_completes_whole_or_gets_503(upstream: FakeUpstream) -> None:
    """16 clients send streams and whole answers in a loop; SIGTERM lands in the middle of it all."""
    server, url = start_server(upstream, concurrency=4)
    upstream.behavior.chunks = 5
    upstream.behavior.pace = 0.05
    upstream.behavior.latency = 0.05
    stop = threading.Event()
    # (kind, status, body). Status 0: no response began (the connection was refused, or closed by the server
    # before it read the request: keep-alive's inherent race, which clients retry). Status -1: a response
    # began and was cut off, which must never happen.
    results: list[tuple[str, int, str]] = []

    def client(index: int) -> None:
        kind = "stream" if index % 2 == 0 else "whole"
        body = chat_body(f"c{index}", stream=kind == "stream")
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                        try:
                            text = response.read().decode()
                        except httpx.HTTPError as exc:
                            results.append((kind, -1, repr(exc)))
                            return
                except httpx.HTTPError:
                    results.append((kind, 0, ""))
                    time.sleep(0.05)
                    continue
                results.append((kind, response.status_code, text))

    try:
        assert wait_until(lambda: _answers(url + "/health"), timeout=20)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: len(results) >= 20, timeout=20)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
        time.sleep(0.2)  # a few refused attempts after the exit
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        stop.set()
        output = reap(server)
    assert "Traceback" not in output, output
    counts = Counter(status for _, status, _ in results)
    assert set(counts) <= {200, 503, 0}, [r for r in results if r[1] not in (200, 503, 0)]
    assert counts[200] >= 20 and counts[503] >= 1, counts  # work before the signal; waiting ones refused
    for kind, status, body in results:
        if status == 200 and kind == "stream":
            assert body.count("tok") == 5 and body.rstrip().endswith("data: [DONE]"), body  # whole streams
        elif status == 200:
            assert body.endswith("}") and '"finish_reason":"stop"' in body.replace(" ", "")
        elif status == 503:
            assert '"shutting_down"' in body


def test_past_the_drain_what_still_runs_is_answered_503_or_its_streams_last_event(upstream: FakeUpstream) -> None:
    server, url = start_server(upstream, concurrency=2, drain_timeout=1)
    background = Background()
    try:
        assert wait_until(lambda: _answers(url + "/health"), timeout=20)
        upstream.behavior.hang_mid_event = True  # whole answers hang; streams send one event, then hang
        upstream.behavior.chunks = 3
        whole = background.post(url + "/v1/chat/completions", chat_body("whole"))
        stream = background.post(url + "/v1/chat/completions", chat_body("stream", stream=True))
        assert wait_until(lambda: httpx.get(url + "/v1/queue/status").json()["processing_count"] == 2)
        server.send_signal(signal.SIGTERM)
        response = whole.result()
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        events = stream.result().content.split(b"\n\n")
        assert events[-2:] == [b"data: [DONE]", b""]
        assert b'"code":"shutting_down"' in events[-3]
        server.wait(timeout=15)
    finally:
        background.close()
        output = reap(server)
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output
