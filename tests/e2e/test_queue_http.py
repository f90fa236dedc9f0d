"""The queue's behaviour through real HTTP: order, bounds, timeouts, cancellation, status and metrics."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from testkit.gateway import Background, RunningGateway, chat_body, wait_until
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]


@pytest.fixture
def background() -> Iterator[Background]:
    bg = Background()
    yield bg
    bg.close()


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    return gateway.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def test_priority_order_under_saturation(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1, max_queue_size=50)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    blocker = background.post(url, chat_body("blocker"), headers={"X-Request-ID": "blocker"})
    assert wait_until(lambda: upstream.active == 1)

    arrivals = ["low-1", "normal-1", "high-1", "low-2", "high-2", "normal-2", "low-3", "high-3"]
    futures = []
    for index, name in enumerate(arrivals):
        priority = name.split("-")[0]
        # Alternate the header and the body field: both set the priority.
        if index % 2:
            futures.append(background.post(url, chat_body(name), headers={"X-Priority": priority}))
        else:
            futures.append(background.post(url, chat_body(name, priority=priority)))
        assert wait_until(lambda n=index + 1: gw.scheduler.waiting == n)  # arrival order is the send order

    status = httpx.get(gw.url + "/v1/queue/status").json()
    assert status["queue_size"] == 8 and status["processing_count"] == 1
    assert status["queue_size_by_priority"] == {"high": 3, "normal": 2, "low": 3, "batch": 0}
    assert status["workers"][0]["busy"] is True

    upstream.behavior.hang = False
    upstream.behavior.latency = 0.01
    assert httpx.delete(gw.url + "/v1/queue/request/blocker").status_code == 200
    assert blocker.result().status_code == 499
    assert all(f.result().status_code == 200 for f in futures)
    served = [seen.body["messages"][0]["content"] for seen in upstream.seen[1:]]
    assert served == ["high-1", "high-2", "high-3", "normal-1", "normal-2", "low-1", "low-2", "low-3"]
    assert all("priority" not in seen.body for seen in upstream.seen)  # our field never goes upstream


def test_full_queue_answers_503_with_retry_after(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1, max_queue_size=2)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.latency = 0.3
    futures = [background.post(url, chat_body(str(i))) for i in range(3)]
    assert wait_until(lambda: gw.scheduler.waiting == 2)
    response = httpx.post(url, json=chat_body("one too many"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_full"
    assert int(response.headers["retry-after"]) >= 1
    assert int(response.headers["retry-after-ms"]) >= 1
    assert response.headers["x-request-id"]
    assert all(f.result().status_code == 200 for f in futures)
    assert metric(gw, "gateway_requests_total", priority="normal", outcome="rejected") == 1
    assert metric(gw, "gateway_requests_total", priority="normal", outcome="completed") == 3
    status = httpx.get(gw.url + "/v1/queue/status").json()
    assert status["total_rejected"] == 1 and status["total_processed"] == 3 and status["total_queued"] == 3


def test_wait_mode_holds_the_request_until_a_place_frees(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1, max_queue_size=1, queue_full_behavior="wait")
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.latency = 0.1
    futures = [background.post(url, chat_body(str(i))) for i in range(4)]
    assert all(f.result().status_code == 200 for f in futures)
    assert gw.scheduler.totals.rejected == 0


def test_timeout_while_queued_and_while_running_are_408(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1, request_timeout=1.0)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    running = background.post(url, chat_body("runs"))
    assert wait_until(lambda: upstream.active == 1)
    low = background.post(url, chat_body("low"), headers={"X-Request-ID": "low-one", "X-Priority": "low"})
    assert wait_until(lambda: gw.scheduler.waiting == 1)
    wait_until(lambda: False, timeout=0.4)
    # Arrives later but overtakes the low one when the running request times out, so the low one
    # spends its whole life in the queue.
    high = background.post(url, chat_body("high"), headers={"X-Priority": "high"})

    assert running.result().status_code == 408
    queued = low.result()
    assert queued.status_code == 408
    assert queued.json()["error"]["code"] == "request_timeout"
    assert "in the queue" in queued.json()["error"]["message"]
    at_backend = high.result()
    assert at_backend.status_code == 408 and "at the backend" in at_backend.json()["error"]["message"]

    record = httpx.get(gw.url + "/v1/queue/request/low-one").json()
    assert record["status"] == "timeout" and record["started_at"] is None
    assert upstream.wait_for(lambda: upstream.active == 0)  # the upstream requests were closed
    assert metric(gw, "gateway_requests_total", priority="normal", outcome="timeout") == 1
    assert metric(gw, "gateway_requests_total", priority="low", outcome="timeout") == 1
    assert metric(gw, "gateway_requests_total", priority="high", outcome="timeout") == 1


def test_timeout_while_streaming_ends_with_an_sse_error_event(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(request_timeout=0.6)
    upstream.behavior.chunks = 100
    upstream.behavior.pace = 0.1
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True)) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert 1 <= len(events) < 100
    assert '"code":"request_timeout"' in events[-2]
    assert events[-1] == "data: [DONE]"
    assert gw.scheduler.totals.timeout == 1


def test_client_disconnect_frees_the_place_at_once(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    background.post(url, chat_body("runs"), timeout=2)
    assert wait_until(lambda: upstream.active == 1)

    body = b'{"model":"m","messages":[{"role":"user","content":"leaves"}]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: leaver\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(request)
        assert wait_until(lambda: gw.scheduler.waiting == 1)
    assert wait_until(lambda: gw.scheduler.waiting == 0, timeout=0.1)  # freed within 100 ms
    assert httpx.get(gw.url + "/v1/queue/request/leaver").json()["status"] == "cancelled"

    # The running request's client hangs up (its 2 s timeout): the upstream call is closed too.
    assert upstream.wait_for(lambda: upstream.abandoned == 1, timeout=5)
    assert wait_until(lambda: gw.scheduler.in_flight == 0)
    assert gw.scheduler.totals.cancelled == 2


def test_disconnect_mid_stream_closes_the_upstream_stream(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    upstream.behavior.chunks = 1000
    upstream.behavior.pace = 0.05
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True)) as response:
        next(response.iter_lines())
    assert upstream.wait_for(lambda: upstream.abandoned == 1)
    assert wait_until(lambda: gw.scheduler.in_flight == 0)
    assert gw.scheduler.totals.cancelled == 1


def test_delete_cancels_waiting_and_running_requests(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    running = background.post(url, chat_body("runs"), headers={"X-Request-ID": "run-1"})
    assert wait_until(lambda: upstream.active == 1)
    waiting = background.post(url, chat_body("waits"), headers={"X-Request-ID": "wait-1"})
    assert wait_until(lambda: gw.scheduler.waiting == 1)

    record = httpx.get(gw.url + "/v1/queue/request/wait-1").json()
    assert record["status"] == "queued" and record["position"] == 1 and record["started_at"] is None
    record = httpx.get(gw.url + "/v1/queue/request/run-1").json()
    assert record["status"] == "processing" and record["position"] is None and record["started_at"]

    cancelled = httpx.delete(gw.url + "/v1/queue/request/wait-1")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    answer = waiting.result()
    assert answer.status_code == 499 and answer.json()["error"]["code"] == "request_cancelled"

    cancelled = httpx.delete(gw.url + "/v1/queue/request/run-1")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert running.result().status_code == 499
    assert upstream.wait_for(lambda: upstream.active == 0)

    again = httpx.delete(gw.url + "/v1/queue/request/run-1")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_finished"
    unknown = httpx.delete(gw.url + "/v1/queue/request/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_request_ids_chosen_by_the_client(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway()
    url = gw.url + "/v1/chat/completions"
    mine = httpx.post(url, json=chat_body(), headers={"X-Request-ID": "my.id_1-A"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "my.id_1-A"
    record = httpx.get(gw.url + "/v1/queue/request/my.id_1-A").json()
    assert record["status"] == "completed" and record["completion_type"] == "chat"
    assert record["queued_at"] <= record["started_at"] <= record["finished_at"]

    bad = httpx.post(url, json=chat_body(), headers={"X-Request-ID": "no spaces/allowed"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-ID"
    too_long = httpx.post(url, json=chat_body(), headers={"X-Request-ID": "a" * 129})
    assert too_long.status_code == 400

    # A finished request's id may be used again.
    assert httpx.post(url, json=chat_body(), headers={"X-Request-ID": "my.id_1-A"}).status_code == 200

    upstream.behavior.hang = True
    background.post(url, chat_body(), headers={"X-Request-ID": "live"}, timeout=1)
    assert wait_until(lambda: upstream.active == 1)
    duplicate = httpx.post(url, json=chat_body(), headers={"X-Request-ID": "live"})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "duplicate_request_id"


def test_every_response_carries_a_request_id(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    for response in (
        httpx.get(gw.url + "/health"),
        httpx.get(gw.url + "/nowhere"),
        httpx.post(gw.url + "/v1/completions", content=b"{"),
    ):
        assert response.headers["x-request-id"]


def test_metrics_move_as_requests_pass(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    url = gw.url + "/v1/completions"
    for priority in ("high", "low", "low"):
        assert httpx.post(url, json={"model": "m", "prompt": "x"}, headers={"X-Priority": priority}).status_code == 200
    upstream.behavior.status = 500
    assert httpx.post(url, json={"model": "m", "prompt": "x"}).status_code == 502
    text = httpx.get(gw.url + "/metrics").text
    assert 'gateway_requests_total{outcome="completed",priority="low"} 2.0' in text
    assert 'gateway_requests_total{outcome="completed",priority="high"} 1.0' in text
    assert 'gateway_requests_total{outcome="failed",priority="normal"} 1.0' in text
    assert 'gateway_queue_wait_seconds_count{model="*",priority="low"} 2.0' in text
    assert 'gateway_request_duration_seconds_count{outcome="completed",priority="low"} 2.0' in text
    assert 'gateway_upstream_errors_total{kind="http_5xx"} 1.0' in text
    assert 'gateway_queue_size{model="*",priority="high"} 0.0' in text
    assert "gateway_requests_in_flight 0.0" in text


def test_service_tier_is_read_as_a_priority_and_kept_from_the_upstream(
    start_gateway: StartGateway, upstream: FakeUpstream, tmp_path: Path
) -> None:
    gw = start_gateway()
    url = gw.url + "/v1/chat/completions"
    for tier, served in (("priority", "high"), ("scale", "normal"), ("default", "normal"), ("auto", "normal")):
        answer = httpx.post(url, json=chat_body(service_tier=tier))
        assert answer.status_code == 200 and answer.headers["x-priority"] == served, tier
    assert httpx.post(url, json=chat_body(service_tier="flex")).headers["x-priority"] == "low"
    assert all("service_tier" not in seen.body for seen in upstream.seen)  # read here, not forwarded
    # X-Priority first, then the body's priority, then the tier.
    assert (
        httpx.post(url, json=chat_body(service_tier="flex"), headers={"X-Priority": "high"}).headers["x-priority"]
        == "high"
    )
    assert httpx.post(url, json=chat_body(service_tier="flex", priority="normal")).headers["x-priority"] == "normal"
    bad = httpx.post(url, json=chat_body(service_tier="gold"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "service_tier"
    # A key's cap holds whatever the tier asks.
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: sk-a, name: a, max_priority: normal}\n")
    capped = start_gateway(api_keys_file=str(keys))
    answer = httpx.post(
        capped.url + "/v1/chat/completions",
        json=chat_body(service_tier="priority"),
        headers={"Authorization": "Bearer sk-a"},
    )
    assert answer.headers["x-priority"] == "normal"
    # FORWARD_SERVICE_TIER: the upstream gets it as the client sent it (OpenAI bills by it).
    forwarding = start_gateway(forward_service_tier=True)
    httpx.post(forwarding.url + "/v1/chat/completions", json=chat_body(service_tier="flex"))
    assert upstream.seen[-1].body["service_tier"] == "flex"


def test_a_client_deadline_shorter_than_request_timeout_applies(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(request_timeout=30)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    forms: list[Callable[[], dict[str, str]]] = [
        lambda: {"X-Request-Timeout-Ms": "300"},
        lambda: {"x-envoy-expected-rq-timeout-ms": "300"},
        lambda: {"X-Request-Deadline": f"{time.time() + 0.3:.3f}"},
        lambda: {"X-Request-Timeout-Ms": "5000", "X-Request-Deadline": f"{time.time() + 0.3:.3f}"},  # the earliest
    ]
    for form in forms:
        headers = form()  # made just before it is sent: a deadline is a moment
        started = time.monotonic()
        answer = httpx.post(url, json=chat_body(), headers=headers, timeout=10)
        assert answer.status_code == 408 and answer.json()["error"]["code"] == "request_timeout", headers
        assert 0.2 < time.monotonic() - started < 2.0, headers
    upstream.behavior.hang = False
    seen = len(upstream.seen)
    passed = httpx.post(url, json=chat_body(), headers={"X-Request-Deadline": f"{time.time() - 1:.3f}"})
    assert passed.status_code == 408 and len(upstream.seen) == seen  # gone on arrival: no upstream call
    for name, value in (
        ("X-Request-Timeout-Ms", "soon"),
        ("X-Request-Deadline", "-5"),
        ("X-Request-Timeout-Ms", "nan"),
    ):
        bad = httpx.post(url, json=chat_body(), headers={name: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == name.lower(), (name, value)
    # A longer one than REQUEST_TIMEOUT does not extend it.
    short = start_gateway(request_timeout=0.3)
    upstream.behavior.hang = True
    started = time.monotonic()
    answer = httpx.post(short.url + "/v1/chat/completions", json=chat_body(), headers={"X-Request-Timeout-Ms": "60000"})
    assert answer.status_code == 408 and time.monotonic() - started < 2.0


def test_a_deadline_the_queue_cannot_meet_is_refused_with_its_eta_and_no_upstream_call(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=1, request_timeout=30)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.latency = 0.4
    assert httpx.post(url, json=chat_body("measure")).status_code == 200  # a service time of about 0.4 s
    running = background.post(url, chat_body("running"))
    assert wait_until(lambda: upstream.active == 1)
    waiting = background.post(url, chat_body("waiting"), headers={"X-Request-ID": "waiting"})
    assert wait_until(lambda: gw.scheduler.waiting == 1)
    record = httpx.get(gw.url + "/v1/queue/request/waiting").json()
    assert record["status"] == "queued" and 0.1 < record["eta_seconds"] < 0.6
    assert 0.1 < record["eta_at_arrival_seconds"] < 0.6
    seen = len(upstream.seen)

    refused = httpx.post(url, json=chat_body("late"), headers={"X-Request-Timeout-Ms": "200"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "deadline_unreachable"
    assert 400 <= int(refused.headers["x-queue-eta-ms"]) <= 1200  # behind the waiting one: about two services
    assert int(refused.headers["retry-after-ms"]) >= 200
    assert len(upstream.seen) == seen and gw.scheduler.waiting == 1  # never queued, never sent
    assert metric(gw, "gateway_rejections_total", reason="deadline_unreachable") == 1

    answered = waiting.result()
    assert answered.status_code == 200
    assert 100 < float(answered.headers["x-queue-eta-ms"]) < 600  # the estimate at arrival, beside the real wait
    assert float(answered.headers["x-queue-wait-ms"]) > 100
    assert running.result().status_code == 200
    done = httpx.get(gw.url + "/v1/queue/request/waiting").json()
    assert done["eta_seconds"] is None and done["eta_at_arrival_seconds"] == record["eta_at_arrival_seconds"]

    trying = start_gateway(max_concurrent_requests=1, deadline_admission=False)
    tried = trying.url + "/v1/chat/completions"
    assert httpx.post(tried, json=chat_body("measure")).status_code == 200
    blocker = background.post(tried, chat_body("running"))
    assert wait_until(lambda: trying.scheduler.in_flight == 1)
    late = httpx.post(tried, json=chat_body("late"), headers={"X-Request-Timeout-Ms": "100"})
    assert late.status_code == 408  # it tried, and timed out in the queue
    assert blocker.result().status_code == 200


def test_reserved_slots_keep_room_for_high_priority_requests(
    start_gateway: StartGateway, upstream: FakeUpstream, background: Background
) -> None:
    gw = start_gateway(max_concurrent_requests=2, reserved_high_slots=1)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    normal = background.post(url, chat_body("normal"), headers={"X-Request-ID": "normal-1"})
    assert wait_until(lambda: upstream.active == 1)
    waiting = background.post(url, chat_body("waits"), headers={"X-Request-ID": "normal-2", "X-Priority": "low"})
    assert wait_until(lambda: gw.scheduler.waiting == 1)  # a slot is free, but it is the reserved one
    assert httpx.get(gw.url + "/v1/queue/request/normal-2").json()["waiting_for"] == "backend_slot"
    high = background.post(url, chat_body("urgent"), headers={"X-Priority": "high", "X-Request-ID": "high-1"})
    assert wait_until(lambda: upstream.active == 2)  # the high one takes the reserved slot at once
    assert gw.scheduler.waiting == 1
    upstream.behavior.hang = False
    assert httpx.delete(gw.url + "/v1/queue/request/high-1").status_code == 200
    assert high.result().status_code == 499
    assert gw.scheduler.waiting == 1  # the slot freed is the reserved one: the low request still waits
    assert httpx.delete(gw.url + "/v1/queue/request/normal-1").status_code == 200
    assert normal.result().status_code == 499
    assert waiting.result().status_code == 200  # a slot others may take freed
