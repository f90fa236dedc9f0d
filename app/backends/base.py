"""The Backend protocol: what the queue may ask of a model, local or remote, and what it gets back."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from app.schemas import CompletionRequest


@dataclass(slots=True, frozen=True)
class Usage:
    """The tokens an answer used, as the backend reported them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, frozen=True)
class BackendResponse:
    """A whole response: body bytes as the client will receive them, and the usage it reported."""

    status: int
    body: bytes
    content_type: str = "application/json"
    usage: Usage | None = None


class BackendStream:
    """An accepted streaming answer: iterate it for its SSE bytes; `usage` is known once it has ended.

    A backend subclasses it and writes `_chunks()`, which sets `self.usage` when the answer reports one.
    Closing it early (aclose) stops the work at the backend.
    """

    __slots__ = ("_chunks_gen", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._chunks_gen = self._chunks()

    def _chunks(self) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks_gen

    async def aclose(self) -> None:
        await self._chunks_gen.aclose()


class Turn:
    """A running request's hold on its backend slot, which the queue may take back for a while (preemption).

    A backend that can pause a request mid-answer without losing anything (the local model) registers how
    while it runs; the queue then parks it to give its slot to a more urgent request, and resumes it later.
    Its client sees only a pause.
    """

    __slots__ = ("_generated", "_park", "_resume")

    def __init__(self) -> None:
        self._park: Callable[[], None] | None = None
        self._resume: Callable[[], None] | None = None
        self._generated: Callable[[], int] | None = None

    def pausable(self, park: Callable[[], None], resume: Callable[[], None], generated: Callable[[], int]) -> None:
        """The backend's means to pause and go on, and to count the tokens generated, while the request runs."""
        self._park, self._resume, self._generated = park, resume, generated

    def counting(self, generated: Callable[[], int]) -> None:
        """The backend's count of the tokens generated, for a request it cannot pause."""
        self._generated = generated

    def done(self) -> None:
        """The backend has let go: nothing is left to pause."""
        self._park = self._resume = None

    def generated(self) -> int | None:
        """Tokens generated so far, where the backend counts them (the dashboard's tokens per second)."""
        return self._generated() if self._generated is not None else None

    @property
    def can_park(self) -> bool:
        return self._park is not None

    def park(self) -> None:
        if self._park is not None:
            self._park()

    def resume(self) -> None:
        if self._resume is not None:
            self._resume()


Prepared = TypeVar("Prepared")


class Backend(Protocol[Prepared]):
    """A model behind the gateway. Errors are raised as app.errors.GatewayError subclasses.

    A request is prepared once, before it waits (so a request the backend cannot serve answers 400 at
    once), and what prepare() returns is what complete() or stream() later receive.
    """

    async def start(self) -> None:
        """Open connections or load the model; called once before the first request."""

    async def prepare(self, request: CompletionRequest) -> Prepared:
        """Check the request and turn it into what this backend sends or runs."""

    def prompt_tokens(self, prepared: Prepared) -> int:
        """The prompt's tokens, counted or estimated, for token budgets (asked only when one is set)."""

    async def complete(self, prepared: Prepared, deadline: float, turn: Turn | None = None) -> BackendResponse:
        """Answer a non-streaming request whole; retries never outlive `deadline` (monotonic). A backend that
        can pause registers how on `turn`."""

    async def stream(self, prepared: Prepared, deadline: float, turn: Turn | None = None) -> BackendStream:
        """Open a streaming request; return once the backend has accepted it, so a refusal is still a status."""

    async def models(self) -> BackendResponse:
        """The /v1/models list."""

    async def health(self) -> None:
        """Return if the backend answers; raise BackendNotReady otherwise."""

    async def aclose(self) -> None:
        """Release connections or the model."""
