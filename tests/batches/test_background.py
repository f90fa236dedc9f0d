"""Background requests (`Prefer: respond-async`): 202 at once, the result later, kept ASYNC_RESULT_TTL."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from testkit.clock import FakeClock
from testkit.gateway import RunningGateway, chat_body, gateway_settings, wait_until
from testkit.upstream import FakeUpstream

ASYNC = {"Prefer": "respond-async"}


def _result(gateway: RunningGateway, request_id: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{gateway.url}/v1/queue/request/{request_id}/result", headers=headers)


def test_the_result_is_kept_for_its_ttl_then_forgotten(upstream: FakeUpstream) -> None:
    clock = FakeClock(time.time())
    settings = gateway_settings(backend="proxy", upstream_base_url=upstream.base_url, async_result_ttl=60)
    gateway = RunningGateway(settings, clock=clock).start()
    try:
        accepted = httpx.post(gateway.url + "/v1/completions", json={"model": "m", "prompt": "hi"}, headers=ASYNC)
        assert accepted.status_code == 202
        request_id = accepted.json()["id"]
        assert wait_until(lambda: _result(gateway, request_id).status_code == 200)
        assert _result(gateway, request_id).json()["object"] == "text_completion"
        clock.advance(59)
        assert _result(gateway, request_id).status_code == 200
        clock.advance(2)
        assert _result(gateway, request_id).status_code == 404
    finally:
        gateway.stop()


def test_errors_refusals_and_cancels(start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream) -> None:
    gateway = start_gateway(API_KEYS="sk-a,sk-b")
    a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
    url = gateway.url + "/v1/chat/completions"
    # What refuses a request refuses it at once, with its own status: nothing is stored.
    refused = httpx.post(url, json=chat_body(max_tokens=-1), headers={**ASYNC, **a})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    streamed = httpx.post(url, json=chat_body(stream=True), headers={**ASYNC, **a})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    # An upstream error is the result, with the upstream's status and body.
    upstream.behavior.status = 422
    failed = httpx.post(url, json=chat_body(), headers={**ASYNC, **a, "X-Request-ID": "will-fail"})
    assert failed.status_code == 202
    assert wait_until(lambda: _result(gateway, "will-fail", **a).status_code == 422)
    assert _result(gateway, "will-fail", **b).status_code == 404  # another key's id is unknown to it
    # A cancelled one ends 499, its result says so.
    upstream.behavior.status = None
    upstream.behavior.latency = 5
    slow = httpx.post(url, json=chat_body(), headers={**ASYNC, **a, "X-Request-ID": "slow"})
    assert slow.status_code == 202
    assert _result(gateway, "slow", **a).status_code == 202
    assert httpx.delete(gateway.url + "/v1/queue/request/slow", headers=a).status_code == 200
    assert wait_until(lambda: _result(gateway, "slow", **a).status_code == 499)
    assert _result(gateway, "slow", **a).json()["error"]["type"]
