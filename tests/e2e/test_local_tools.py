"""tools / tool_choice on the bundled model: calls the SDK parses, whole and streamed; a required or named choice
always calls; auto may answer in words; what cannot be a tool is a 400 naming it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from testkit.gateway import RunningGateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        # Bounded strings: a small model sampled hot may otherwise ramble inside one past max_tokens.
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_required_choice_always_calls_with_valid_arguments(local_sdk: openai.OpenAI) -> None:
    for seed in range(6):
        answer = local_sdk.chat.completions.create(
            model="local", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            max_tokens=80, temperature=0.9, seed=seed,
        )  # fmt: skip
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments, dict) and set(arguments) == (
            {"city"} if call.function.name == "get_weather" else {"zone"}
        )


def test_a_named_choice_calls_that_function_and_streams_as_the_sdk_expects(local_sdk: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = local_sdk.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=80, temperature=0
    )
    (call,) = whole.choices[0].message.tool_calls or []
    assert call.function.name == "get_time"
    calls, reasons = [], []
    for chunk in local_sdk.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=80, temperature=0,
        stream=True,
    ):  # fmt: skip
        if chunk.choices:
            calls += chunk.choices[0].delta.tool_calls or []
            reasons.append(chunk.choices[0].finish_reason)
    assert [c.function.name for c in calls if c.function] == ["get_time"]
    assert json.loads(calls[0].function.arguments or "") == json.loads(call.function.arguments)  # greedy: the same
    assert reasons[-1] == "tool_calls"


def test_a_tool_result_goes_back_and_none_means_words(local_sdk: openai.OpenAI) -> None:
    first = local_sdk.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    follow_up: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 24 C"}'},
    ]
    answer = local_sdk.chat.completions.create(
        model="local", messages=follow_up, tools=[WEATHER], tool_choice="none", max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    auto = local_sdk.chat.completions.create(model="local", messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0)
    message = auto.choices[0].message
    assert message.tool_calls or message.content  # the model's choice; either way a well-formed answer


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": "weather"}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_tools_it_cannot_use_are_400s_naming_the_parameter(
    local: RunningGateway, extra: dict[str, Any], param: str
) -> None:
    answer = httpx.post(local.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
