"""POST /v1/embeddings through the queue: the bundled model's own vectors, and a proxied upstream's."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable

import httpx
import openai
import pytest

from testkit.gateway import RunningGateway
from testkit.upstream import FakeUpstream

DIMENSIONS = 576  # SmolLM2-135M's hidden size


def _floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_every_input_form_through_the_sdk(local_sdk: openai.OpenAI) -> None:
    one = local_sdk.embeddings.create(model="local", input="The queue holds requests.")
    assert len(one.data) == 1 and len(one.data[0].embedding) == DIMENSIONS
    assert one.usage.prompt_tokens == one.usage.total_tokens > 0
    assert math.isclose(sum(v * v for v in one.data[0].embedding), 1.0, rel_tol=1e-4)  # unit length
    many = local_sdk.embeddings.create(model="local", input=["red", "green", "blue"])
    assert [d.index for d in many.data] == [0, 1, 2]
    ids = local_sdk.embeddings.create(model="local", input=[1, 2, 3, 4])
    assert len(ids.data) == 1 and ids.usage.prompt_tokens == 4
    lists = local_sdk.embeddings.create(model="local", input=[[1, 2], [3, 4, 5]])
    assert len(lists.data) == 2 and lists.usage.prompt_tokens == 5


def test_base64_equals_floats_and_batched_equals_alone(local: RunningGateway) -> None:
    url = local.url + "/v1/embeddings"
    texts = ["first input", "a second, longer input about priority queues", "third"]
    floats = httpx.post(url, json={"input": texts, "encoding_format": "float"}).json()
    encoded = httpx.post(url, json={"input": texts, "encoding_format": "base64"}).json()
    for plain, packed in zip(floats["data"], encoded["data"], strict=True):
        assert isinstance(packed["embedding"], str)
        assert max(abs(a - b) for a, b in zip(plain["embedding"], _floats(packed["embedding"]), strict=True)) < 1e-6
    for index, text in enumerate(texts):
        alone = httpx.post(url, json={"input": text, "encoding_format": "float"}).json()["data"][0]["embedding"]
        batched = floats["data"][index]["embedding"]
        assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) < 1e-5  # the same, whatever beside it
    again = httpx.post(url, json={"input": texts[0], "encoding_format": "float"}).json()["data"][0]["embedding"]
    first = httpx.post(url, json={"input": texts[0], "encoding_format": "float"}).json()["data"][0]["embedding"]
    assert again == first
    assert floats["data"][0]["embedding"] != floats["data"][2]["embedding"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", 3]}, "input"),
        ({"input": [[1, 2], []]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": "hi", "dimensions": 10}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hi", "stream": True}, "stream"),
        ({"input": "word " * 1100}, "input"),  # past N_CTX (1024)
    ],
)
def test_what_the_model_cannot_embed_is_a_400_naming_it(
    local: RunningGateway, body: dict[str, object], param: str
) -> None:
    answer = httpx.post(local.url + "/v1/embeddings", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_embeddings_are_requests_of_the_queue(local: RunningGateway) -> None:
    answer = httpx.post(
        local.url + "/v1/embeddings", json={"input": "hi"}, headers={"X-Priority": "high", "X-Request-ID": "emb-1"}
    )
    assert answer.status_code == 200 and answer.headers["x-priority"] == "high"
    record = httpx.get(local.url + "/v1/queue/request/emb-1").json()
    assert record["completion_type"] == "embedding" and record["status"] == "completed"
    metrics = httpx.get(local.url + "/metrics").text
    assert 'gateway_requests_total{outcome="completed",priority="high"}' in metrics


def test_the_proxy_forwards_embeddings(start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream) -> None:
    gateway = start_gateway(API_KEYS_FILE=None)
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    answer = sdk.embeddings.create(model="m", input=["a", "b"], dimensions=8)
    assert len(answer.data) == 2 and answer.usage.prompt_tokens == 2
    seen = upstream.seen[-1]
    assert seen.path == "/v1/embeddings" and seen.body["input"] == ["a", "b"] and seen.body["dimensions"] == 8
    upstream.behavior.status = 422
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.embeddings.create(model="m", input="x")
