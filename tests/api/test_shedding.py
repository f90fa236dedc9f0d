"""Completions refused for a full queue from their headers: the same answer as the queue's, held to Retry-After."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from testkit.gateway import CHAT, Background, RunningGateway, wait_until
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]


@contextmanager
def full_gateway(start_gateway: StartGateway, upstream: FakeUpstream, **settings: object) -> Iterator[RunningGateway]:
    """A gateway whose one slot and one queue place are taken (by requests that take 3 s upstream)."""
    upstream.behavior.latency = 3.0
    gw = start_gateway(max_concurrent_requests=1, max_queue_size=1, **settings)
    background = Background()
    headers = {"Authorization": "Bearer k-1"} if settings.get("api_keys") else None
    for _ in range(2):
        background.post(gw.url + "/v1/chat/completions", CHAT, headers=headers)
    assert upstream.wait_for(lambda: upstream.active == 1)
    deadline = time.monotonic() + 5
    while gw.call(lambda: gw.scheduler.waiting_room.sizes()["normal"]) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield gw
    finally:
        background.close()


def request(body: dict[str, object], *headers: str, close: bool = False) -> bytes:
    raw = orjson.dumps(body)
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json", *headers]
    if close:
        head.append("Connection: close")
    head.append(f"Content-Length: {len(raw)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, object]]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, orjson.loads(body)


def rejected(gw: RunningGateway, priority: str) -> float:
    line = f'gateway_requests_total{{outcome="rejected",priority="{priority}"}} '
    text = httpx.get(gw.url + "/metrics").text
    return next(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))


def test_a_completion_meeting_a_full_queue_is_refused_as_the_queue_would(
    start_gateway: StartGateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        full_gateway(start_gateway, upstream, api_keys="k-1") as gw,
        caplog.at_level(logging.INFO, logger="app.access"),
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock,
    ):
        sock.sendall(request({**CHAT, "priority": "high"}, "Authorization: Bearer k-1", "X-Request-ID: mine-1"))
        status, headers, body = read_answer(sock)
        assert status == 503 and headers["x-request-id"] == "mine-1"
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
        error = body["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_error"  # type: ignore[index]
        assert gw.call(lambda: gw.scheduler.totals.rejected) == 1
        assert rejected(gw, "high") == 1  # counted at the priority its body asked for
        assert "connection" not in headers  # kept alive
        (line,) = [r for r in caplog.records if getattr(r, "request_id", None) == "mine-1"]
        assert line.key == "key-1" and line.outcome == "rejected" and line.status == 503  # type: ignore[attr-defined]


def test_a_refused_connection_is_not_read_again_before_its_retry_after(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    with (
        full_gateway(start_gateway, upstream) as gw,
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock,
    ):
        sock.sendall(request(CHAT))
        refused_at = time.monotonic()
        status, headers, _ = read_answer(sock)
        assert status == 503
        retry_after = int(headers["retry-after-ms"]) / 1000
        sock.sendall(request(CHAT))  # at once, ignoring the Retry-After
        status, _, _ = read_answer(sock)
        assert time.monotonic() - refused_at >= retry_after * 0.95
        assert status == 503  # the queue is still full: read when told, and judged then
        assert gw.call(lambda: gw.scheduler.totals.rejected) == 2


def test_what_the_headers_cannot_vouch_for_gets_its_own_answer_on_a_full_queue(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    with full_gateway(start_gateway, upstream, api_keys="k-1") as gw:
        url = gw.url + "/v1/chat/completions"
        assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer nope"}).status_code == 401
        bad_priority = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k-1", "X-Priority": "urgent"})
        assert bad_priority.status_code == 400 and bad_priority.json()["error"]["param"] == "X-Priority"
        bad_id = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k-1", "X-Request-ID": "a b"})
        assert bad_id.status_code == 400
        assert gw.call(lambda: gw.scheduler.totals.rejected) == 0


def test_a_refusal_to_a_client_that_closes_closes_the_connection(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    with (
        full_gateway(start_gateway, upstream) as gw,
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock,
    ):
        sock.sendall(request(CHAT, close=True))
        status, headers, _ = read_answer(sock)
        assert status == 503 and headers["connection"] == "close"
        assert sock.recv(1) == b""


def test_a_key_with_a_budget_of_its_own_is_told_its_own_429_on_a_full_queue(
    start_gateway: StartGateway, upstream: FakeUpstream, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: k-1, name: one}\n  - {key: k-rpm, name: metered, rpm: 1}\n")
    upstream.behavior.latency = 3.0
    gw = start_gateway(api_keys_file=str(keys), max_concurrent_requests=1, max_queue_size=1)
    url = gw.url + "/v1/chat/completions"
    background = Background()
    try:
        background.post(url, CHAT, headers={"Authorization": "Bearer k-rpm"})  # its one request this minute
        assert upstream.wait_for(lambda: upstream.active == 1)
        background.post(url, CHAT, headers={"Authorization": "Bearer k-1"})
        assert wait_until(lambda: gw.call(gw.scheduler.sheds))
        again = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k-rpm"})
        assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limit_exceeded"
        other = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k-1"})
        assert other.status_code == 503 and other.json()["error"]["code"] == "queue_full"
    finally:
        background.close()
