"""The fault-injecting upstream: 5xx, 429, dropped connections, hangs and a dead upstream."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import httpx
import orjson
import pytest

from app.backends.proxy import without_credentials
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
        assert error["type"] == "upstream_error" and error["message"] == "the upstream answered 500"
    assert gw.scheduler.totals.failed == 2
    assert gw.scheduler.roster.slots[0].errors == 2


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
    upstream.behavior.drop = True
    # The upstream had the request when it hung up: it is not sent again by default ...
    gw = start_gateway()
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body())
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    registry = gw.app.state.metrics.registry
    assert registry.get_sample_value("gateway_upstream_errors_total", {"kind": "protocol"}) == 1
    assert len(upstream.seen) == 1
    # ... and is with UPSTREAM_RETRY_ON_TIMEOUT (UPSTREAM_MAX_RETRIES=2 by default): three attempts, then the 502.
    gw = start_gateway(upstream_retry_on_timeout=True)
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body()).status_code == 502
    registry = gw.app.state.metrics.registry
    assert registry.get_sample_value("gateway_upstream_errors_total", {"kind": "protocol"}) == 3
    assert registry.get_sample_value("gateway_upstream_retries_total", {"reason": "protocol"}) == 2
    assert len(upstream.seen) == 4


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


def test_credentials_and_the_upstreams_address_never_reach_a_client(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    gw = start_gateway(
        upstream_base_url=f"http://gateway:s3cret-pass@127.0.0.1:{port}/v1",
        upstream_max_retries=0,
        breaker_failure_threshold=0,
    )
    with caplog.at_level(logging.INFO):
        ready = httpx.get(gw.url + "/ready")
        failed = [httpx.post(gw.url + "/v1/chat/completions", json=chat_body(stream=s)) for s in (False, True)]
    assert ready.status_code == 503 and [r.status_code for r in failed] == [502, 502]
    for response in (ready, *failed):
        assert "s3cret" not in response.text and str(port) not in response.text and "127.0.0.1" not in response.text
    assert failed[0].json()["error"]["message"] == "the upstream could not be reached or broke off (connect)"
    # The operator sees where, without the password.
    assert f"127.0.0.1:{port}" in caplog.text and "s3cret" not in caplog.text


def test_without_credentials_keeps_everything_but_the_userinfo() -> None:
    assert without_credentials("http://u:p@host:8000/v1") == "http://host:8000/v1"
    assert without_credentials("https://token@[::1]/v1") == "https://[::1]/v1"
    assert without_credentials("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1"


def test_a_read_timeout_is_not_sent_again_unless_the_operator_opts_in(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.behavior.hang = True
    for opted_in, posts in ((False, 1), (True, 3)):
        gw = start_gateway(
            upstream_read_timeout=0.3,
            upstream_max_retries=2,
            upstream_retry_backoff=0.01,
            upstream_retry_on_timeout=opted_in,
            breaker_failure_threshold=0,
        )
        before = len(upstream.seen)
        response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(), timeout=10)
        assert response.status_code == 502 and response.json()["error"]["message"].endswith("(timeout)")
        assert len(upstream.seen) - before == posts


def test_a_refused_connection_is_retried(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gw = start_gateway(
        upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_max_retries=2, upstream_retry_backoff=0.01
    )
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body()).status_code == 502
    assert gw.app.state.metrics.retries["connect"] == 2


def test_a_timeout_in_the_middle_of_an_event_ends_the_stream_with_whole_events(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(request_timeout=1.0)
    upstream.behavior.hang_mid_event = True
    upstream.behavior.chunks = 3
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True), timeout=10) as response:
        assert response.status_code == 200
        raw = b"".join(response.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [orjson.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    assert "choices" in payloads[0]  # the whole first event
    assert payloads[-1]["error"]["code"] == "request_timeout"  # then the error, on a line of its own
    assert len(payloads) == 2  # the half event never reached the client


def test_an_upstream_answer_that_is_not_json_or_too_large_is_a_502_not_a_completion(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(max_response_bytes=1_000_000)
    upstream.behavior.raw_body = b"<html>Bad gateway, from some proxy in between</html>"
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body())
    assert response.status_code == 502 and response.json()["error"]["code"] == "bad_upstream_response"
    upstream.behavior.raw_body = orjson.dumps({"choices": [{"message": {"content": "x" * 2_000_000}}]})
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body())
    assert response.status_code == 502 and "MAX_RESPONSE_BYTES" in response.json()["error"]["message"]
    assert gw.scheduler.totals.failed == 2
    upstream.behavior.raw_body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body()).status_code == 200  # a bounded, JSON answer
    assert gw.app.state.metrics.token_counts == {"prompt": 1, "completion": 2}
