"""The real openai package against the real gateway: sync, async, streaming; chat and completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from testkit.gateway import Background, RunningGateway, wait_until
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]
MESSAGES = [{"role": "user", "content": "hi there"}]


def client(gw: RunningGateway, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", **kwargs)  # type: ignore[arg-type]


def test_sync_chat_and_completion(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    sdk = client(gw)
    chat = sdk.chat.completions.create(model="fake-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == "echo: hi there"
    assert chat.usage is not None and chat.usage.total_tokens == 5
    text = sdk.completions.create(model="fake-model", prompt="say")
    assert text.choices[0].text == "echo: say"


def test_sync_streams(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    sdk = client(gw)
    chat = sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chat) == "tok0 tok1 tok2 tok3 tok4 "
    text = sdk.completions.create(model="fake-model", prompt="x", stream=True)
    assert "".join(c.choices[0].text for c in text) == "tok0 tok1 tok2 tok3 tok4 "


def test_extra_fields_are_forwarded_untouched(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    raw = client(gw).chat.completions.with_raw_response.create(
        model="fake-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0.3,
        seed=7,
        extra_body={"priority": "high", "some_future_param": {"nested": [1, 2]}},
    )
    body = upstream.seen[-1].body
    assert body["some_future_param"] == {"nested": [1, 2]} and body["seed"] == 7 and body["temperature"] == 0.3
    assert "priority" not in body
    record = gw.scheduler.registry.lookup(raw.headers["x-request-id"], None)
    assert record is not None and record.priority.value == "high"


def test_async_client_many_at_once(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(max_concurrent_requests=4)
    upstream.behavior.latency = 0.02

    async def run() -> list[str]:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
        async with sdk:
            calls = [
                sdk.chat.completions.create(
                    model="fake-model",
                    messages=[{"role": "user", "content": str(i)}],
                    extra_headers={"X-Priority": ("high", "normal", "low")[i % 3]},
                )
                for i in range(30)
            ]
            results = await asyncio.gather(*calls)
            stream = await sdk.completions.create(model="fake-model", prompt="x", stream=True)
            streamed = "".join([c.choices[0].text async for c in stream])
        return [r.choices[0].message.content or "" for r in results] + [streamed]

    answers = asyncio.run(run())
    assert answers[:30] == [f"echo: {i}" for i in range(30)]
    assert answers[30] == "tok0 tok1 tok2 tok3 tok4 "
    assert gw.scheduler.totals.completed == 31


def test_models_lists_the_upstreams(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway()
    assert [m.id for m in client(gw).models.list()] == ["fake-model"]


def test_sdk_sees_queue_full_as_a_503_after_honouring_retry_after(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(max_concurrent_requests=1, max_queue_size=1)
    upstream.behavior.hang = True
    background = Background()
    blockers = [background.post(gw.url + "/v1/completions", {"model": "m", "prompt": "x"}, timeout=1) for _ in range(2)]
    assert wait_until(lambda: gw.scheduler.waiting == 1 and gw.scheduler.in_flight == 1)
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw, max_retries=0).completions.create(model="m", prompt="x")
    assert caught.value.status_code == 503
    # No service time measured yet: one place is taken to free in a second, plus up to half of it as jitter.
    assert 1000 <= int(caught.value.response.headers["retry-after-ms"]) <= 1500
    background.close()
    assert all(isinstance(f.exception(), Exception) for f in blockers)  # their clients gave up after 1 s


def test_clients_refused_together_are_told_different_times_and_all_get_through(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.behavior.latency = 0.1

    def ask(sdk: openai.OpenAI) -> object:
        return sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

    for _ in range(10):
        gw = start_gateway(max_queue_size=1, max_concurrent_requests=1)
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=5)
        ask(sdk)  # the service time is measured from here on
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(ask, [sdk] * 10))  # raises if any ran out of retries
        assert len(replies) == 10
        # Most were refused at first (8 when all ten land within one 0.1 s service time; a loaded machine
        # staggers them a little), and every one got through on its retries.
        assert gw.scheduler.totals.completed == 11 and gw.scheduler.totals.rejected >= 5
        gw.stop()


def test_queue_updates_reach_a_waiting_stream_as_comments_the_sdk_skips(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.latency = 0.2  # measured first, so each waiting request has an ETA
    assert httpx.post(url, json={"model": "m", "messages": MESSAGES}).status_code == 200
    upstream.behavior.latency = 1.2
    with Background() as background:
        blocker = background.post(url, {"model": "m", "messages": MESSAGES})
        assert wait_until(lambda: upstream.active == 1)
        ahead = background.post(url, {"model": "m", "messages": MESSAGES})
        assert wait_until(lambda: gw.scheduler.waiting == 1)
        lines: list[str] = []
        started = time.monotonic()
        with httpx.stream(
            "POST", url, json={"model": "m", "messages": MESSAGES, "stream": True}, headers={"X-Queue-Updates": "true"}
        ) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            first_line_after = None
            for line in response.iter_lines():
                first_line_after = first_line_after or time.monotonic() - started
                lines.append(line)
        assert first_line_after is not None and first_line_after < 0.5  # at once, long before its turn
        comments = [line for line in lines if line.startswith(":")]
        assert comments[0].startswith(": queue position=2 eta_ms=") and comments[0].endswith("priority=normal")
        assert any(line.startswith(": queue position=1 ") for line in comments)  # it moved up
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) == 6  # then the normal chunks: five and [DONE]
        assert blocker.result().status_code == 200 and ahead.result().status_code == 200

        # The openai SDK reads such a stream unchanged.
        blocker = background.post(url, {"model": "m", "messages": MESSAGES})
        assert wait_until(lambda: upstream.active == 1)
        stream = client(gw).chat.completions.create(
            model="m",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Queue-Updates": "true"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "tok0 tok1 tok2 tok3 tok4 "
        assert blocker.result().status_code == 200


def test_a_failure_while_a_stream_with_updates_waits_is_its_last_event(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(max_concurrent_requests=1, request_timeout=30)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with Background() as background:
        blocker = background.post(url, {"model": "m", "messages": MESSAGES}, headers={"X-Request-ID": "blocker"})
        assert wait_until(lambda: upstream.active == 1)
        timed = httpx.post(url, json=body, headers={"X-Queue-Updates": "true", "X-Request-Timeout-Ms": "600"})
        assert timed.status_code == 200  # the response had started: the timeout is its last event
        assert timed.text.startswith(": queue position=1")
        assert '"code":"request_timeout"' in timed.text and timed.text.endswith("data: [DONE]\n\n")
        with pytest.raises(openai.APIError, match="was cancelled"):
            waiting = client(gw, max_retries=0).chat.completions.create(
                model="m",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                extra_headers={"X-Queue-Updates": "true", "X-Request-ID": "cancel-me"},
            )
            assert gw.scheduler.waiting == 1
            assert httpx.delete(gw.url + "/v1/queue/request/cancel-me").status_code == 200
            list(waiting)
        plain = httpx.post(url, json=body, headers={"X-Request-Timeout-Ms": "300"})
        assert plain.status_code == 408  # without the header, statuses stay real statuses
        assert httpx.delete(gw.url + "/v1/queue/request/blocker").status_code == 200
        assert blocker.result().status_code == 499
