"""HTTP details: HEAD on the probes, no redirects, HTTP/1.0 streams, the key on every access line."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import httpx
import orjson
import pytest

from testkit.gateway import CHAT, RunningGateway, wait_until

StartGateway = Callable[..., RunningGateway]


def test_the_probes_answer_head(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    for path in ("/health", "/ready"):
        response = httpx.head(gw.url + path)
        assert response.status_code == 200 and response.content == b""


def test_a_trailing_slash_is_not_redirected_to_the_clients_host(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    response = httpx.get(gw.url + "/v1/queue/status/", headers={"Host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


def test_an_http_1_0_client_gets_its_stream_whole_with_a_content_length(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    body = orjson.dumps({**CHAT, "stream": True})
    request = (
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    headers = head.decode().lower()
    assert headers.startswith("http/1.1 200") and "transfer-encoding" not in headers
    assert f"content-length: {len(payload)}" in headers and "text/event-stream" in headers
    assert payload.endswith(b"data: [DONE]\n\n") and payload.count(b"data: ") >= 3


def test_the_access_line_names_the_key_on_queue_routes_too(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway(api_keys="k-1")
    with caplog.at_level(logging.INFO, logger="app.access"):
        assert httpx.get(gw.url + "/v1/queue/status", headers={"Authorization": "Bearer k-1"}).status_code == 200
        # The line is written once the response has gone out: the client may read it a moment before.
        assert wait_until(lambda: any(r.name.startswith("app.access") for r in caplog.records))
    (line,) = [r for r in caplog.records if r.name.startswith("app.access")]
    assert line.key == "key-1"  # type: ignore[attr-defined]
