"""Which conversation a request belongs to, so that its pool can send it back to the member that served it
last, whose prompt cache still holds the conversation so far."""

from __future__ import annotations

from typing import Any

import orjson

from app.schemas import CompletionRequest

_PROMPT_PREFIX_CHARS = 512  # of a text completion's prompt: what turns of one conversation share


def conversation(request: CompletionRequest, session: str | None) -> int:
    """A number naming the conversation: from X-Session-ID, else the `user` field, else the prompt's start.

    For a chat, the start is every message up to and including the first user message (the system prompt and
    the opening question), which every later turn of the conversation repeats unchanged.
    """
    if session:
        return hash(("session", session))
    payload = request.payload
    user = payload.get("user")
    if isinstance(user, str) and user:
        return hash(("user", user))
    if request.kind == "chat":
        return hash(orjson.dumps(_opening(payload.get("messages") or [])))
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return hash(prompt[:_PROMPT_PREFIX_CHARS])
    return hash(orjson.dumps(prompt)[:_PROMPT_PREFIX_CHARS])


def _opening(messages: list[Any]) -> list[Any]:
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[: index + 1]
    return messages[:1]
