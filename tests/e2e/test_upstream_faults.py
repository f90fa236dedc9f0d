"""The fault-injecting upstream: 5xx, 429, dropped connections, hangs and a dead upstream."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from testkit.gateway import RunningGateway, chat_body
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]


def test_upstream_500_is_502_in_openai_shape(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    upstream.behavior.status = 500
    for stream in (False, True):
        response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(stream=stream))
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["type"] == "upstream_error" and "500" in error["message"]
    assert gw.scheduler.totals.failed == 2
    assert gw.scheduler.slots[0].errors == 2


def test_upstream_4xx_passes_through_with_its_headers(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(upstream_max_retries=0)  # retries have their own tests
    upstream.behavior.status = 429
    upstream.behavior.retry_after = "1"
    for stream in (False, True):
        response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(stream=stream))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["message"] == "injected 429"
    upstream.behavior.status = 400
    upstream.behavior.retry_after = None
    response = httpx.post(gw.url + "/v1/completions", json={"prompt": "x"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "fake_error"


def test_dropped_connection_is_502(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    upstream.behavior.drop = True
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body())
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    # A dropped connection is retried (UPSTREAM_MAX_RETRIES=2 by default): three attempts, then the 502.
    registry = gw.app.state.metrics.registry
    assert registry.get_sample_value("gateway_upstream_errors_total", {"kind": "protocol"}) == 3
    assert registry.get_sample_value("gateway_upstream_retries_total", {"reason": "protocol"}) == 2
    assert len(upstream.seen) == 3


def test_connection_dropped_mid_stream_ends_with_an_sse_error(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway()
    upstream.behavior.drop_mid_stream = True
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True)) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[0].startswith('data: {"id":"chatcmpl-fake"')
    assert '"type":"upstream_error"' in events[-2] and events[-1] == "data: [DONE]"
    assert gw.scheduler.totals.failed == 1


def test_hanging_upstream_times_out(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(request_timeout=0.3)
    upstream.behavior.hang = True
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 408  # the stream had not begun: a real status code
    assert upstream.wait_for(lambda: upstream.abandoned == 1)


def test_dead_upstream_is_502_and_not_ready(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    # The discard port: nothing listens. No retries, so one request makes one attempt.
    gw = start_gateway(upstream_base_url="http://127.0.0.1:9/v1", upstream_max_retries=0)
    assert httpx.get(gw.url + "/ready").status_code == 503
    assert httpx.get(gw.url + "/ready").json()["error"]["code"] == "backend_not_ready"
    assert httpx.get(gw.url + "/health").status_code == 200
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body())
    assert response.status_code == 502
    registry = gw.app.state.metrics.registry
    assert registry.get_sample_value("gateway_upstream_errors_total", {"kind": "connect"}) == 1


def test_ready_when_upstream_answers(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    assert httpx.get(gw.url + "/ready").json() == {"status": "ready"}
    gw.drain()
    assert httpx.get(gw.url + "/ready").status_code == 503
