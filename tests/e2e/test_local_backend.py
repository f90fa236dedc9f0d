"""The in-process backend with the real bundled model (SmolLM2-135M-Instruct, Q4_1) through real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import httpx
import jsonschema
import openai
import orjson
import pytest

from testkit.gateway import Background, RunningGateway, wait_until

StartLocal = Callable[..., RunningGateway]
PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "What is 2+2?"]


def ask(gw: RunningGateway, content: str, **params: object) -> openai.types.chat.ChatCompletion:
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    params = {"temperature": 0, **params}
    return sdk.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": content}],
        **params,  # type: ignore[arg-type]
    )


@pytest.fixture
def background() -> Iterator[Background]:
    bg = Background()
    yield bg
    bg.close()


def test_greedy_is_deterministic_and_streaming_agrees(start_local: StartLocal) -> None:
    gw = start_local()
    first = ask(gw, PROMPTS[0], max_tokens=20)
    second = ask(gw, PROMPTS[0], max_tokens=20)
    text = first.choices[0].message.content
    assert text and text == second.choices[0].message.content
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.completion_tokens == 20 and first.usage.prompt_tokens > 5
    assert first.model == "SmolLM2-135M-Instruct.Q4_1"
    # The repeat found its prompt's KV cells still resident and evaluated only the last prompt token.
    assert first.usage.prompt_tokens_details is not None and second.usage is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1

    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    chunks = list(
        sdk.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_text_completions_and_token_prompts(start_local: StartLocal) -> None:
    gw = start_local()
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    text = sdk.completions.create(model="local", prompt="The quick brown fox", temperature=0, max_tokens=12)
    assert text.choices[0].text and text.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(
            model="local", prompt="The quick brown fox", temperature=0, max_tokens=12, stream=True
        )
    )
    assert streamed == text.choices[0].text
    by_ids = sdk.completions.create(model="local", prompt=[504, 2365, 6354], temperature=0, max_tokens=4)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 3


def test_batched_equals_alone_for_greedy(start_local: StartLocal) -> None:
    gw = start_local(max_concurrent_requests=4)
    alone = [ask(gw, p, max_tokens=24).choices[0].message.content for p in PROMPTS]

    async def together() -> list[str | None]:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
        async with sdk:
            replies = await asyncio.gather(
                *[
                    sdk.chat.completions.create(
                        model="local", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24
                    )
                    for p in PROMPTS
                ]
            )
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(together()) == alone
    workers = gw.scheduler.roster.slots
    # The sequential ones all reused slot 0; the concurrent four needed every slot at once.
    assert [w.processed for w in workers] == [5, 1, 1, 1]


def test_stop_sequences(start_local: StartLocal) -> None:
    gw = start_local()
    full = ask(gw, PROMPTS[2], max_tokens=24).choices[0].message.content
    assert full is not None
    words = full.split()
    assert len(words) > 3
    stop = " " + words[2]
    expected = full[: full.index(stop)]
    cut = ask(gw, PROMPTS[2], max_tokens=24, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in sdk.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": PROMPTS[2]}],
            temperature=0,
            max_tokens=24,
            stop=stop,
            stream=True,
        )
    )
    assert streamed == expected


def test_seeded_sampling_repeats_and_options_are_accepted(start_local: StartLocal) -> None:
    gw = start_local()
    params = {
        "temperature": 0.9,
        "top_p": 0.9,
        "max_tokens": 16,
        "seed": 1234,
        "extra_body": {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1},
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
    }
    one = ask(gw, PROMPTS[1], **params).choices[0].message.content
    assert one == ask(gw, PROMPTS[1], **params).choices[0].message.content


def test_cancel_mid_stream_frees_the_slot(start_local: StartLocal) -> None:
    gw = start_local(max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body, headers={"X-Request-ID": "long-one"}, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.delete(gw.url + "/v1/queue/request/long-one").json()["status"] == "cancelled"
        rest = [line for line in lines if line.startswith("data: ")]
    assert '"code":"request_cancelled"' in rest[-2] and rest[-1] == "data: [DONE]"
    assert gw.scheduler.in_flight == 0
    # The slot is free at once: a short request is answered without waiting for 400 tokens.
    quick = httpx.post(url, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=10)
    assert quick.status_code == 200


def test_disconnect_mid_stream_frees_the_slot(start_local: StartLocal) -> None:
    gw = start_local(max_concurrent_requests=1)
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as response:
        next(response.iter_lines())
    assert wait_until(lambda: gw.scheduler.in_flight == 0, timeout=2)
    assert gw.scheduler.totals.cancelled == 1


def test_context_overflow_is_400(start_local: StartLocal) -> None:
    gw = start_local(n_ctx=128)
    long_text = "word " * 300
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        ("/v1/completions", {"prompt": long_text}),
    ]:
        response = httpx.post(gw.url + path, json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "128" in error["message"]
    # A prompt that fits but asks for more than the rest of the context stops at its end. Greedy: a sampled
    # continuation may draw the end token before the context is full, and end as "stop" (it did once).
    body = {"prompt": "word " * 100, "max_tokens": 500, "temperature": 0}
    near = httpx.post(gw.url + "/v1/completions", json=body).json()
    assert near["choices"][0]["finish_reason"] == "length"
    assert near["usage"]["total_tokens"] == 128


def test_unsupported_options_are_400(start_local: StartLocal) -> None:
    gw = start_local()
    url = gw.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    for extra, param in [
        ({"n": 2}, "n"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"stop": [1, 2]}, "stop"),
        ({"top_k": -1}, "top_k"),
        ({"seed": "x"}, "seed"),
    ]:
        response = httpx.post(url, json={"messages": msgs, **extra})
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
    echo = httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "echo": "yes"})
    assert echo.status_code == 400 and echo.json()["error"]["param"] == "echo"


def test_echo_repeats_the_prompt_ahead_of_the_answer(start_local: StartLocal) -> None:
    gw = start_local()
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    prompt = "The capital of France is"
    plain = sdk.completions.create(model="local", prompt=prompt, max_tokens=6, temperature=0)
    echoed = sdk.completions.create(model="local", prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage is not None and plain.usage is not None
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens  # the echo is not generated
    chunks = list(
        sdk.completions.create(model="local", prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True)
    )
    assert chunks[0].choices[0].text == prompt and "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    tokens = gw.app.state.fleet.members[0].backend._engine.model.tokenize(" Paris is", False)
    by_ids = sdk.completions.create(model="local", prompt=tokens, max_tokens=2, temperature=0, echo=True)
    assert by_ids.choices[0].text.startswith(" Paris is")


def test_models_and_ready(start_local: StartLocal) -> None:
    gw = start_local(model_alias="tiny")
    assert httpx.get(gw.url + "/ready").json() == {"status": "ready"}
    models = httpx.get(gw.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert ask(gw, "Hi", max_tokens=2).model == "tiny"


def test_priority_still_orders_the_queue(start_local: StartLocal, background: Background) -> None:
    gw = start_local(max_concurrent_requests=1, preemption=False)  # the high one waits for the slot here
    url = gw.url + "/v1/chat/completions"

    def body(n: int) -> dict[str, object]:
        return {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": n, "temperature": 0}

    running = background.post(url, body(200), headers={"X-Request-ID": "busy", "X-Priority": "low"})
    assert wait_until(lambda: gw.scheduler.in_flight == 1)
    waiting = []
    for index, priority in enumerate(["low", "normal", "high"]):
        waiting.append(background.post(url, body(4), headers={"X-Request-ID": priority, "X-Priority": priority}))
        assert wait_until(lambda n=index + 1: gw.scheduler.waiting == n)
    status = httpx.get(gw.url + "/v1/queue/status").json()
    assert status["workers"][0]["current_request_id"] == "busy"
    assert httpx.get(gw.url + "/v1/queue/request/low").json()["position"] == 3
    assert running.result().status_code == 200 and all(f.result().status_code == 200 for f in waiting)
    started = {
        rid: httpx.get(f"{gw.url}/v1/queue/request/{rid}").json()["started_at"] for rid in ("high", "normal", "low")
    }
    assert started["high"] < started["normal"] < started["low"]


def test_a_request_without_max_tokens_stops_at_default_max_tokens(start_local: StartLocal) -> None:
    gw = start_local(MAX_CONCURRENT_REQUESTS=1, DEFAULT_MAX_TOKENS=6)
    reply = ask(gw, "Write a very long story about a dragon.")
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    assert reply.choices[0].finish_reason == "length"
    longer = ask(gw, "Write a very long story about a dragon.", max_tokens=9)
    assert longer.usage is not None and longer.usage.completion_tokens == 9


def test_the_tier_served_is_reported_as_openai_does(start_local: StartLocal) -> None:
    gw = start_local(max_concurrent_requests=1)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert plain.service_tier == "default"
    flex = client.chat.completions.create(model="m", messages=messages, max_tokens=2, service_tier="flex")
    assert flex.service_tier == "flex"
    urgent = client.chat.completions.create(
        model="m", messages=messages, max_tokens=2, extra_headers={"X-Priority": "high"}
    )
    assert urgent.service_tier == "priority"
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=2, stream=True))
    assert {chunk.service_tier for chunk in chunks} == {"default"}


def test_a_high_request_preempts_low_work_whose_greedy_text_stays_the_same(
    start_local: StartLocal, background: Background
) -> None:
    gw = start_local(max_concurrent_requests=1, preempt_max=1)
    url = gw.url + "/v1/chat/completions"
    low_body = {
        "model": "local",
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "temperature": 0,
        "max_tokens": 160,
    }
    reference = httpx.post(url, json=low_body, timeout=120).json()["choices"][0]["message"]["content"]

    high_body = {**low_body, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}

    def running_at_the_model() -> bool:
        job = gw.scheduler.registry.lookup("low", None)
        return job is not None and job.turn is not None and job.turn.can_park

    low = background.post(url, low_body, headers={"X-Priority": "low", "X-Request-ID": "low"}, timeout=120)
    assert wait_until(running_at_the_model, timeout=30)
    with httpx.stream("GET", gw.url + "/v1/queue/events", timeout=10) as events:  # the dashboard's view of it
        for line in events.iter_lines():
            if line.startswith("data: "):
                (slot,) = orjson.loads(line[6:])["backends"][0]["slots"]
                if slot["tokens_per_s"]:  # its first tokens are out
                    break
    assert slot["request_id"] == "low" and slot["priority"] == "low" and slot["tokens_per_s"] > 0
    first = httpx.post(url, json=high_body, headers={"X-Priority": "high", "X-Request-ID": "h1"}, timeout=60)
    assert first.status_code == 200 and not low.done()  # it did not wait for the low one's slot
    assert httpx.get(gw.url + "/v1/queue/request/low").json()["status"] == "processing"  # resumed
    second = background.post(url, high_body, headers={"X-Priority": "high", "X-Request-ID": "h2"}, timeout=120)
    answered = low.result()
    assert answered.status_code == 200
    assert answered.json()["choices"][0]["message"]["content"] == reference  # byte for byte, pause or not
    assert second.result().status_code == 200
    low_done = httpx.get(gw.url + "/v1/queue/request/low").json()
    second_record = httpx.get(gw.url + "/v1/queue/request/h2").json()
    assert second_record["started_at"] >= low_done["finished_at"] - 0.05  # PREEMPT_MAX=1: parked once only
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_preemptions_total{priority="low"} 1.0' in metrics


def test_structured_output_always_parses_and_validates(start_local: StartLocal) -> None:
    gw = start_local(max_concurrent_requests=2)
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Give the name and population of a large city as JSON."}
    ]
    for seed in range(8):  # sampled, so each seed takes its own path through the grammar
        answer = sdk.chat.completions.create(
            model="local",
            messages=messages,
            temperature=0.9,
            seed=seed,
            max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        )
        content = answer.choices[0].message.content
        assert content is not None and answer.choices[0].finish_reason == "stop", (seed, content)
        jsonschema.validate(json.loads(content), schema)
    short: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": 'Reply with the JSON object {"answer": "yes"} and nothing else.'}
    ]
    chunks = list(
        sdk.chat.completions.create(
            model="local",
            messages=short,
            temperature=0,
            max_tokens=400,
            stream=True,
            response_format={"type": "json_object"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict | list)
    url = gw.url + "/v1/chat/completions"
    for bad in (
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": 3}},
        "json",
    ):
        refused = httpx.post(url, json={"messages": messages, "response_format": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format", bad
