"""What the engine thread tells the event loop: a sequence's text, then exactly one end; an embedding's vectors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A generated token's bytes and log-probability under the model, with the most likely alternatives."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]


@dataclass(slots=True, frozen=True)
class Delta:
    """Text generated since the last event (stop strings already held back or cut), and, when the request
    asked for logprobs, those of the tokens that text came from."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True, frozen=True)
class Done:
    """The sequence ended: `stop` (end of text or a stop string) or `length`, with its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cells were reused rather than evaluated


@dataclass(slots=True, frozen=True)
class Failed:
    """The engine could not go on with the sequence."""

    message: str


@dataclass(slots=True, frozen=True)
class Embedded:
    """An embedding request's vectors, one per input in order, each of unit length."""

    vectors: list[list[float]]


Event = Delta | Done | Failed | Embedded
