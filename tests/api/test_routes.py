"""The one routing table: what it mounts, what the OpenAPI description says, and errors in the OpenAI shape."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.backends.base import BackendResponse, BackendStream, Turn
from app.schemas import COMPLETION_ROUTES, CompletionRequest
from testkit.gateway import RunningGateway, gateway_settings


class BrokenBackend:
    """Fails every completion and the model list with a bug of its own (not a GatewayError)."""

    async def start(self) -> None:
        pass

    async def prepare(self, request: CompletionRequest) -> CompletionRequest:
        return request

    def prompt_tokens(self, prepared: CompletionRequest) -> int:
        return 1

    async def complete(self, prepared: CompletionRequest, deadline: float, turn: Turn | None = None) -> BackendResponse:
        raise RuntimeError("a bug in the backend")

    async def stream(self, prepared: CompletionRequest, deadline: float, turn: Turn | None = None) -> BackendStream:
        raise RuntimeError("a bug in the backend")

    async def models(self) -> BackendResponse:
        raise RuntimeError("a bug in the backend")

    async def health(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[RunningGateway]:
    running = RunningGateway(gateway_settings(backend="proxy"), backend=BrokenBackend()).start()
    yield running
    running.stop()


def test_the_openapi_description_lists_every_completion_route_once(gateway: RunningGateway) -> None:
    paths = httpx.get(gateway.url + "/openapi.json").json()["paths"]
    for path in COMPLETION_ROUTES:
        assert list(paths[path]) == ["post"]
    assert "/v1/models" in paths and "/v1/queue/status" in paths


@pytest.mark.parametrize("path", list(COMPLETION_ROUTES))
def test_a_bug_while_serving_answers_500_in_the_openai_shape_with_its_request_id(
    gateway: RunningGateway, path: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}
    streams = (False, True) if COMPLETION_ROUTES[path] != "embedding" else (None, None)  # embeddings never stream
    for stream in streams:
        sent = {**body, "stream": stream} if stream is not None else body
        response = httpx.post(gateway.url + path, json=sent, headers={"X-Request-ID": "bug"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "bug"
        assert response.json()["error"]["type"] == "internal_error"
        assert (
            gateway.scheduler.registry.lookup("bug", None) is not None
            and gateway.scheduler.registry.lookup("bug", None).state == "failed"
        )
    assert gateway.scheduler.totals.failed == 2 and gateway.scheduler.in_flight == 0


@pytest.mark.parametrize("path", list(COMPLETION_ROUTES))
def test_other_methods_on_a_completion_route_answer_405_in_the_openai_shape(gateway: RunningGateway, path: str) -> None:
    response = httpx.get(gateway.url + path)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_a_405_on_any_route_says_which_methods_it_takes(gateway: RunningGateway) -> None:
    response = httpx.post(gateway.url + "/v1/queue/status")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_bug_in_any_other_route_answers_500_in_the_openai_shape_with_its_request_id(
    gateway: RunningGateway,
) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers={"X-Request-ID": "models-bug"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "models-bug"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
