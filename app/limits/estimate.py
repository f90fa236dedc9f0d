"""Token counts before the fact, for budgets: a request's cost is its prompt plus the most it may generate."""

from __future__ import annotations

from typing import Any

# English text averages about four characters per token in the tokenizers of OpenAI, Llama and Mistral.
# The estimate only holds a place in a budget until the response reports its real usage.
CHARS_PER_TOKEN = 4
# Chat templates wrap each message in a few tokens of role markers, and prime the answer with a few more.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def _text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    if isinstance(content, list):  # content parts: count the text ones
        return sum(
            _text_tokens(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def estimate_prompt_tokens(payload: dict[str, Any], kind: str) -> int:
    """Prompt tokens of a chat or text completion body (or an embedding request's input), estimated without a
    tokenizer."""
    if kind == "chat":
        messages = payload.get("messages") or []
        return TOKENS_PER_REPLY + sum(
            TOKENS_PER_MESSAGE + _content_tokens(m.get("content")) for m in messages if isinstance(m, dict)
        )
    prompt = payload.get("input" if kind == "embedding" else "prompt")
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += _text_tokens(item)
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0
