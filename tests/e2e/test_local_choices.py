"""n > 1 on the bundled model: choices from one prompt evaluation, each a slot, each with its own seed, whole and
streamed, through the real SDK."""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai

from testkit.gateway import RunningGateway

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def test_each_choice_answers_as_a_lone_request_with_its_seed(local_sdk: openai.OpenAI) -> None:
    together = local_sdk.chat.completions.create(
        model="local", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7, n=3
    )
    assert [choice.index for choice in together.choices] == [0, 1, 2]
    alone = [
        local_sdk.chat.completions.create(model="local", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7 + i)
        for i in range(3)
    ]
    texts = [choice.message.content for choice in together.choices]
    assert texts == [answer.choices[0].message.content for answer in alone]
    assert len(set(texts)) == 3  # distinct seeds, distinct answers
    assert together.usage is not None and alone[0].usage is not None
    # The prompt is counted once (its choices share its evaluation), the completions all.
    assert together.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone if a.usage is not None)
    assert together.usage.total_tokens == together.usage.prompt_tokens + together.usage.completion_tokens


def prompt_tokens(gateway: RunningGateway) -> dict[str, float]:
    """gateway_prompt_tokens_total by source, from /metrics."""
    text = httpx.get(gateway.url + "/metrics").text
    pattern = r'gateway_prompt_tokens_total\{[^}]*source="(\w+)"[^}]*\} (\S+)'
    return {source: float(value) for source, value in re.findall(pattern, text)}


def test_three_choices_evaluate_their_prompt_once(local: RunningGateway, local_sdk: openai.OpenAI) -> None:
    before = prompt_tokens(local)
    messages = [{"role": "user", "content": f"A question no slot has seen: {time.time()}. What is two plus two?"}]
    answer = local_sdk.chat.completions.create(
        model="local", messages=messages, max_tokens=8, temperature=1.0, seed=2, n=3
    )
    after = prompt_tokens(local)
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    prompt, cached = answer.usage.prompt_tokens, answer.usage.prompt_tokens_details.cached_tokens or 0
    assert len(answer.choices) == 3
    # The model evaluated what no slot held, once; the other two choices reused all of it.
    assert after["evaluated"] - before["evaluated"] == prompt - cached
    assert after["reused"] - before["reused"] == cached + 2 * prompt


def test_streamed_choices_are_the_whole_ones(local_sdk: openai.OpenAI) -> None:
    whole = local_sdk.chat.completions.create(
        model="local", messages=MESSAGES, max_tokens=12, temperature=0.8, seed=3, n=2
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    usage = None
    for chunk in local_sdk.chat.completions.create(
        model="local",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0.8,
        seed=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [choice.message.content for choice in whole.choices]
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_text_choices_with_echo_and_logprobs(local_sdk: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    options = {"model": "local", "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    answer = local_sdk.completions.create(**options, n=3, echo=True)  # type: ignore[call-overload]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.text.startswith(prompt) for c in answer.choices)
    scored = local_sdk.completions.create(**options, n=2, logprobs=1)  # type: ignore[call-overload]
    for choice, echoed in zip(scored.choices, answer.choices, strict=False):
        assert choice.logprobs is not None and "".join(choice.logprobs.tokens or []) == choice.text
        assert prompt + choice.text == echoed.text  # the same seeds, with or without echo and logprobs


def test_a_required_tool_is_called_by_every_choice(local_sdk: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = local_sdk.chat.completions.create(
        model="local", messages=messages, tools=tools, tool_choice="required", n=2, temperature=1.0, seed=5
    )  # type: ignore[call-overload]
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"


def test_choices_take_a_slot_each(local: RunningGateway) -> None:
    """With four slots, a request of three choices leaves room for one: a request of two waits for it to end."""
    body = {"messages": MESSAGES, "max_tokens": 400, "temperature": 1.0, "n": 3, "stream": True}
    started = threading.Event()
    stop = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", local.url + "/v1/chat/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                started.set()
                if stop.is_set():
                    return

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert started.wait(30)
        status = httpx.get(local.url + "/v1/queue/status").json()
        assert status["processing_count"] == 1
        assert sum(1 for worker in status["workers"] if worker["busy"]) == 3
        assert status["backends"][0]["in_flight"] == 3
        metrics = httpx.get(local.url + "/metrics").text
        assert "gateway_requests_in_flight 1.0" in metrics  # one request, holding three slots
        assert re.search(r'gateway_backend_in_flight\{backend="[^"]+"\} 3\.0', metrics)
        result: dict[str, httpx.Response] = {}
        waiter = threading.Thread(
            target=lambda: result.update(
                pair=httpx.post(
                    local.url + "/v1/chat/completions",
                    json={"messages": MESSAGES, "max_tokens": 4, "n": 2},
                    timeout=60,
                )
            )
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(local.url + "/v1/queue/status").json()["queue_size"] != 1:
            assert time.monotonic() < deadline, "the request of two choices did not wait"
            time.sleep(0.02)
    finally:
        stop.set()
        holder.join(60)
    waiter.join(60)
    assert result["pair"].status_code == 200 and len(result["pair"].json()["choices"]) == 2


def test_more_choices_than_slots_is_400(local: RunningGateway) -> None:
    url = local.url + "/v1/chat/completions"
    for n in (5, 0, 129, "2"):
        response = httpx.post(url, json={"messages": MESSAGES, "n": n})
        assert response.status_code == 400, n
        assert response.json()["error"]["param"] == "n"
    assert "MAX_CONCURRENT_REQUESTS" in httpx.post(url, json={"messages": MESSAGES, "n": 5}).json()["error"]["message"]


def test_several_prompts_answer_n_choices_each_in_prompt_order(local_sdk: openai.OpenAI) -> None:
    prompts = ["The sky is", "Paris is"]
    options = {"model": "local", "max_tokens": 6, "temperature": 0.9, "seed": 21}
    answer = local_sdk.completions.create(prompt=prompts, n=2, echo=True, **options)  # type: ignore[call-overload]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    alone = [local_sdk.completions.create(prompt=p, **{**options, "seed": 21 + i}) for p in prompts for i in range(2)]
    for choice, lone, prompt in zip(answer.choices, alone, [p for p in prompts for _ in range(2)], strict=True):
        assert choice.text == prompt + lone.choices[0].text  # prompt p's choice i: prompt p alone, seed 21 + i
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone[::2] if a.usage is not None)
    assert answer.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone if a.usage is not None)
    # Token ids and text mixed in one list, streamed.
    texts = {0: "", 1: ""}
    for chunk in local_sdk.completions.create(
        model="local", prompt=[[504, 3012, 314], "Hello"], max_tokens=4, temperature=0, stream=True
    ):  # type: ignore[call-overload]
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(texts.values())


def test_more_sequences_than_slots_over_several_prompts_is_400(local: RunningGateway) -> None:
    response = httpx.post(local.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "6 sequences" in error["message"]
    mixed = httpx.post(local.url + "/v1/completions", json={"prompt": ["a", 5]})
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "prompt"
