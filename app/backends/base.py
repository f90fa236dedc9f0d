"""The Backend protocol: what the queue and the HTTP layer may ask of a model, local or remote."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from app.schemas import CompletionRequest


@dataclass(slots=True, frozen=True)
class BackendResponse:
    """A whole response: body bytes as the client will receive them."""

    status: int
    body: bytes
    content_type: str = "application/json"


class Backend(Protocol):
    """A model behind the gateway. Errors are raised as app.errors.GatewayError subclasses."""

    async def start(self) -> None:
        """Open connections or load the model; called once before the first request."""

    async def count_prompt_tokens(self, request: CompletionRequest) -> int:
        """The request's prompt tokens, counted or estimated, for token budgets (asked only when one is set)."""

    async def complete(self, request: CompletionRequest) -> BackendResponse:
        """Answer a non-streaming request; set request.used_tokens when request.track_usage and usage is known."""

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[bytes, None]:
        """Open a streaming request and return its SSE bytes as they come.

        Returns only once the backend has accepted the request, so a refusal still reaches the client as a
        status code. Closing the generator early stops the work at the backend.
        """

    async def models(self) -> BackendResponse:
        """The /v1/models list."""

    async def health(self) -> None:
        """Return if the backend answers; raise BackendNotReady otherwise."""

    async def aclose(self) -> None:
        """Release connections or the model."""
