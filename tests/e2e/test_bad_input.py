"""Bad input answers a clear OpenAI-style 4xx: never a 500, never a hang."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from testkit.gateway import CHAT, RunningGateway
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]
MSG = [{"role": "user", "content": "x"}]

CASES = [
    ("chat", b"not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", b'{"model": "m"}', 400, "messages"),
    ("chat", b'{"model": "m", "messages": "hello"}', 400, "messages"),
    ("chat", b'{"model": "m", "messages": []}', 400, "messages"),
    ("chat", b'{"model": "m", "messages": [42]}', 400, "messages[0]"),
    ("chat", b'{"model": 5, "messages": [{"role": "user"}]}', 400, "model"),
    ("chat", b'{"messages": [{"role": "user"}], "max_tokens": 0}', 400, "max_tokens"),
    ("chat", b'{"messages": [{"role": "user"}], "max_tokens": "10"}', 400, "max_tokens"),
    ("chat", b'{"messages": [{"role": "user"}], "stream": "yes"}', 400, "stream"),
    ("chat", b'{"messages": [{"role": "user"}], "temperature": 9}', 400, "temperature"),
    ("chat", b'{"messages": [{"role": "user"}], "priority": "urgent"}', 400, "priority"),
    ("chat", b'{"messages": [{"role": "user"}], "priority": 1}', 400, "priority"),
    ("completion", b'{"model": "m"}', 400, "prompt"),
    ("completion", b'{"model": "m", "prompt": {"a": 1}}', 400, "prompt"),
]


@pytest.mark.parametrize(("kind", "body", "status", "param"), CASES)
def test_bad_bodies(
    start_gateway: StartGateway, upstream: FakeUpstream, kind: str, body: bytes, status: int, param: str | None
) -> None:
    gw = start_gateway()
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    response = httpx.post(gw.url + path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert upstream.seen == []  # nothing bad reaches the upstream
    assert gw.scheduler.totals.queued == 0


def test_unknown_priority_header(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    response = httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG}, headers={"X-Priority": "asap"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Priority"


def test_body_over_the_limit_is_413_with_or_without_content_length(start_gateway: StartGateway) -> None:
    gw = start_gateway(max_body_bytes=2048)
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 4096 + b'"}]}'
    declared = httpx.post(gw.url + "/v1/chat/completions", content=big)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunked() -> object:
        yield big[:1000]
        yield big[1000:]

    undeclared = httpx.post(gw.url + "/v1/chat/completions", content=chunked())  # type: ignore[arg-type]
    assert undeclared.status_code == 413


def test_unknown_route_and_method(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    missing = httpx.get(gw.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(gw.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_max_tokens_past_the_limit_or_past_64_bits_answer_400_naming_it(start_gateway: StartGateway) -> None:
    gw = start_gateway(MAX_TOKENS_LIMIT=100)
    for field in ("max_tokens", "max_completion_tokens"):
        response = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, field: 101})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == field and error["code"] == "max_tokens_exceeded" and "100" in error["message"]
    huge = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1180591620717411303424}'
    response = httpx.post(gw.url + "/v1/chat/completions", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens" and "too large" in response.json()["error"]["message"]
    assert httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 100}).status_code == 200
