"""What the engine thread tells the event loop about a sequence: text, then exactly one end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Delta:
    """Text generated since the last event (stop strings already held back or cut)."""

    text: str


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


Event = Delta | Done | Failed
