"""logit_bias on the bundled model, and the OpenAI parameters it does not provide answering 400 by name."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import llama_cpp
import openai
import pytest

from app.backends.llama import default_model_path
from testkit.gateway import RunningGateway


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    model = llama_cpp.Llama(model_path=default_model_path(), vocab_only=True, verbose=False)
    yield model
    model.close()


def token(vocab: llama_cpp.Llama, text: str) -> int:
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == 1, ids
    return int(ids[0])


def test_a_banned_token_never_comes_and_a_favoured_one_always_does(
    local_sdk: openai.OpenAI, vocab: llama_cpp.Llama
) -> None:
    prompt = "The capital of France is"
    plain = local_sdk.completions.create(model="local", prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.tokens
    first = plain.choices[0].logprobs.tokens[0]
    banned = local_sdk.completions.create(
        model="local",
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        logprobs=0,
        logit_bias={str(token(vocab, first)): -100},
    )
    assert banned.choices[0].logprobs is not None
    assert first not in (banned.choices[0].logprobs.tokens or [])
    favoured = local_sdk.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=3,
        temperature=0.8,
        seed=1,
        logit_bias={str(token(vocab, " banana")): 100},
    )
    assert favoured.choices[0].message.content == " banana" * 3


def test_what_the_local_model_does_not_provide_is_400_by_name(local: RunningGateway) -> None:
    chat = local.url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    for extra, param in [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"store": True}, "store"),
        ({"verbosity": "low"}, "verbosity"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"10": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
    ]:
        response = httpx.post(chat, json={"messages": messages, "max_tokens": 1, **extra})
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param, extra
    text = local.url + "/v1/completions"
    for extra, param in [({"suffix": " end."}, "suffix"), ({"best_of": 3}, "best_of")]:
        response = httpx.post(text, json={"prompt": "x", "max_tokens": 1, **extra})
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param, extra
    # What asks nothing of the model passes: hints, and the values that mean "not asked".
    for extra in [
        {"user": "u-1", "metadata": {"a": "b"}, "prompt_cache_key": "k", "safety_identifier": "s"},
        {"store": False, "modalities": ["text"], "parallel_tool_calls": False},
        {"prediction": {"type": "content", "content": "Hello"}},
    ]:
        assert httpx.post(chat, json={"messages": messages, "max_tokens": 1, **extra}).status_code == 200, extra
    assert httpx.post(text, json={"prompt": "x", "max_tokens": 1, "best_of": 1, "suffix": ""}).status_code == 200
