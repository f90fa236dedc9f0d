"""What the gateway enforces on client connections: header size, slow headers and bodies, connection count."""

from __future__ import annotations

import logging
import resource
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
import orjson
import pytest

from app.api.connections import ConnectionGuard
from app.server import fit_open_files
from testkit.gateway import CHAT, RunningGateway, wait_until
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]


@contextmanager
def connection(gw: RunningGateway) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        yield sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except ConnectionResetError:
        pass
    return raw


def answer(raw: bytes) -> tuple[int, str, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode().lower(), orjson.loads(body)


def closed_count(gw: RunningGateway, reason: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    line = f'gateway_connections_closed_total{{reason="{reason}"}} '
    return next(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))


def test_headers_past_max_header_bytes_get_431_and_the_connection_closes(start_gateway: StartGateway) -> None:
    gw = start_gateway(max_header_bytes=4096)
    assert httpx.get(gw.url + "/health", headers={"X-Pad": "a" * 3500}).status_code == 200
    with connection(gw) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n")
        status, head, body = answer(read_all(sock))
    assert status == 431 and "connection: close" in head
    assert body["error"] == {
        "message": "the request's headers are over 4096 bytes (MAX_HEADER_BYTES)",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_headers_too_large",
    }
    assert closed_count(gw, "headers_too_large") == 1


def test_a_header_that_never_ends_is_cut_at_the_limit_not_buffered(start_gateway: StartGateway) -> None:
    gw = start_gateway(max_header_bytes=32768)
    sent = 0
    with connection(gw) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            for _ in range(64):  # 64 MiB, if the gateway read it all
                sock.sendall(b"a" * (1 << 20))
                sent += 1
        except OSError:
            pass
    assert sent < 16, f"the gateway took {sent} MiB of one header"
    assert httpx.get(gw.url + "/health").status_code == 200


def test_headers_sent_too_slowly_get_408(start_gateway: StartGateway, caplog: pytest.LogCaptureFixture) -> None:
    gw = start_gateway(header_timeout=0.4)
    with caplog.at_level(logging.WARNING, logger="app.connections"), connection(gw) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sock.settimeout(0.1)
        raw = b""
        while not raw and time.monotonic() - started < 5:
            try:
                sock.sendall(b"X")  # a byte at a time, never the end of the headers
                raw = sock.recv(65536)
            except TimeoutError:
                continue
        held = time.monotonic() - started
    status, _, body = answer(raw)
    assert status == 408 and body["error"]["code"] == "client_timeout"  # type: ignore[index]
    assert 0.4 <= held < 2.0
    assert any("HEADER_TIMEOUT=0.4s" in r.getMessage() for r in caplog.records)


def test_an_idle_connection_that_never_sends_a_request_is_closed(start_gateway: StartGateway) -> None:
    gw = start_gateway(header_timeout=0.3)
    with connection(gw) as sock:
        started = time.monotonic()
        status, _, _ = answer(read_all(sock))
        assert status == 408 and time.monotonic() - started < 2.0


def test_a_body_sent_too_slowly_gets_408_and_is_never_queued(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(body_timeout=0.4)
    body = orjson.dumps(CHAT)
    with connection(gw) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]
        )
        started = time.monotonic()
        status, _, answered = answer(read_all(sock))
    assert status == 408 and answered["error"]["code"] == "client_timeout"  # type: ignore[index]
    assert time.monotonic() - started < 2.0
    assert upstream.seen == []
    assert gw.call(lambda: gw.scheduler.totals.queued) == 0


def test_past_max_connections_requests_get_503_while_the_probes_still_answer(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.behavior.latency = 3.0
    gw = start_gateway(max_connections=3, max_concurrent_requests=8)
    with ExitStack() as stack, httpx.Client(timeout=10) as client:
        busy = [stack.enter_context(connection(gw)) for _ in range(3)]
        body = orjson.dumps(CHAT)
        for sock in busy:  # three completions in progress: none of these connections is idle
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
        assert upstream.wait_for(lambda: upstream.active == 3)
        refused = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(gw.url + path, timeout=5).status_code == 200
        assert closed_count(gw, "too_many_connections") >= 1
        for sock in busy:
            assert answer(sock.recv(65536))[0] == 200
        del client


def test_at_max_connections_a_newcomer_takes_the_place_of_the_oldest_idle_connection(
    start_gateway: StartGateway,
) -> None:
    gw = start_gateway(max_connections=3)
    with ExitStack() as stack:
        idle = [stack.enter_context(connection(gw)) for _ in range(3)]
        assert wait_until(lambda: gw.call(lambda: len(gw.app.state.connections.connections)) == 3)
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""  # the oldest idle one was closed to make room
        assert httpx.get(gw.url + "/health", timeout=5).status_code == 200


def test_max_connections_is_lowered_to_what_the_open_files_limit_allows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: None)
    guard = ConnectionGuard(
        max_connections=2048, max_header_bytes=32768, max_body_bytes=4 << 20, header_timeout=10, body_timeout=30
    )
    with caplog.at_level(logging.WARNING, logger="app.connections"):
        fit_open_files(guard, upstream_connections=64)
    assert guard.max_connections + guard.reserve <= 1024 - 128 - 64
    assert guard.max_connections > 700
    assert "MAX_CONNECTIONS=2048 lowered to" in caplog.text
