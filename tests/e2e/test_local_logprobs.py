"""logprobs on the bundled model: chat's logprobs / top_logprobs and text completions' logprobs, whole and
streamed, through the real SDK."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from testkit.gateway import RunningGateway

MESSAGES = [{"role": "user", "content": "Name three colors."}]


def test_chat_logprobs_are_sensible_and_the_same_streamed(local_sdk: openai.OpenAI) -> None:
    whole = local_sdk.chat.completions.create(
        model="local", messages=MESSAGES, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        alternatives = [t.logprob for t in entry.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert sum(math.exp(p) for p in alternatives) <= 1 + 1e-6
        # Greedy: the token taken is the most likely one.
        assert entry.top_logprobs[0].token == entry.token and math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert bytes(entry.bytes or []) == entry.token.encode()
    streamed = []
    for chunk in local_sdk.chat.completions.create(
        model="local", messages=MESSAGES, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in entries]
    plain = local_sdk.chat.completions.create(model="local", messages=MESSAGES, max_tokens=16, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_text_completion_logprobs(local_sdk: openai.OpenAI) -> None:
    answer = local_sdk.completions.create(model="local", prompt="The sky is", max_tokens=8, temperature=0, logprobs=2)
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [
        sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(len(choice.logprobs.tokens))
    ]
    assert all(p <= 0 for p in choice.logprobs.token_logprobs or [])
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs or [])
    streamed: list[str] = []
    offsets: list[int] = []
    for chunk in local_sdk.completions.create(
        model="local", prompt="The sky is", max_tokens=8, temperature=0, logprobs=2, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.tokens or []
            offsets += chunk.choices[0].logprobs.text_offset or []
    assert streamed == choice.logprobs.tokens and offsets == choice.logprobs.text_offset


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 3}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "logprobs": 1, "echo": True}, "echo"),
    ],
)
def test_logprobs_it_cannot_give_are_400s_naming_the_parameter(
    local: RunningGateway, path: str, body: dict[str, object], param: str
) -> None:
    answer = httpx.post(local.url + path, json={"max_tokens": 4, **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
