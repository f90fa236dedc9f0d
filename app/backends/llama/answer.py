"""The OpenAI shapes of the local model's answers: whole choices, a stream's chunks, logprobs and usage."""

from __future__ import annotations

from typing import Any

import orjson

from app.backends.base import Usage
from app.backends.llama.events import Delta, Done, TokenLogprob
from app.backends.llama.prompt import LocalRequest
from app.backends.llama.tools import read_call

SSE_DONE = b"data: [DONE]\n\n"


def whole_choice(
    prepared: LocalRequest, index: int, text: str, tokens: list[TokenLogprob], reason: str
) -> dict[str, Any]:
    """One whole choice: its message (a tool call, when the answer is one) or text, logprobs and finish."""
    text = prepared.prompt_of(index).echo + text
    chat = prepared.kind == "chat"
    content: dict[str, Any] = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    logprobs = logprobs_body(tokens, chat, 0) if prepared.logprobs is not None else None
    call = read_call(text, prepared.tools) if prepared.tools is not None else None
    if call is not None:
        content = {"message": {"role": "assistant", "content": None, "tool_calls": [call]}}
        reason = "tool_calls"
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": reason}


class StreamedChoice:
    """One choice of a stream: its chunks, the text offset its logprobs count from, and, with tools, the text
    held until it is known not to be a call (or the answer ends)."""

    __slots__ = ("_base", "_chat", "_held", "_index", "_logprobs", "_offset", "_plan")

    def __init__(self, index: int, prepared: LocalRequest, base: dict[str, Any]):
        self._index = index
        self._base = base
        self._chat = prepared.kind == "chat"
        self._logprobs = prepared.logprobs is not None
        self._offset = 0  # text completions' logprobs.text_offset runs across the chunks
        self._plan = prepared.tools
        self._held: list[str] | None = [] if prepared.tools is not None else None

    def chunk(
        self, text: str | None, reason: str | None, role: bool = False, tokens: tuple[TokenLogprob, ...] = ()
    ) -> bytes:
        logprobs = logprobs_body(tokens, self._chat, self._offset) if self._logprobs and tokens else None
        self._offset += len(text or "")
        index = self._index
        if self._chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return sse({**self._base, "choices": [choice]})

    def text(self, delta: Delta) -> bytes | None:
        """The chunk for a delta, or None while it is held."""
        held, plan = self._held, self._plan
        if held is None:
            return self.chunk(delta.text, None, tokens=delta.logprobs)
        held.append(delta.text)
        opening = "".join(held).lstrip()
        if opening and not opening.startswith("{") and plan is not None and plan.grammar is None:
            self._held = None
            return self.chunk("".join(held), None)
        return None

    def end(self, reason: str) -> list[bytes]:
        """The chunks that end the choice: what was held (or the call it makes), then its finish."""
        chunks = []
        held, plan = self._held, self._plan
        if held is not None and plan is not None:
            call = read_call("".join(held), plan)
            if call is None:
                chunks.append(self.chunk("".join(held), None))
            else:
                chunks.append(sse({**self._base, "choices": [call_delta(self._index, call)]}))
                reason = "tool_calls"
        chunks.append(self.chunk(None, reason))
        return chunks


def call_delta(index: int, call: dict[str, Any]) -> dict[str, Any]:
    """A stream's choice carrying a whole tool call (the SDK gathers deltas; one is enough)."""
    delta = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def logprobs_body(tokens: list[TokenLogprob] | tuple[TokenLogprob, ...], chat: bool, offset: int) -> dict[str, Any]:
    """OpenAI's logprobs of these tokens: chat's `content` entries, or the text completions' columns (whose
    text_offset starts at `offset`, the characters of the answer before them)."""
    if chat:
        return {
            "content": [_entry(t.token, t.logprob, [_entry(b, p) for b, p in t.top]) for t in tokens],
            "refusal": None,
        }
    texts = [t.token.decode("utf-8", "replace") for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{b.decode("utf-8", "replace"): p for b, p in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _entry(token: bytes, logprob: float, top: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"token": token.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(token)}
    if top is not None:
        entry["top_logprobs"] = top
    return entry


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def total_usage(dones: list[Done], n: int) -> Usage:
    """Each prompt counted once (its n choices share its evaluation: its first choice's Done says it), and every
    choice's completion."""
    prompts = dones[::n]
    return Usage(sum(done.prompt_tokens for done in prompts), sum(done.completion_tokens for done in dones))


def usage_body(dones: list[Done], n: int) -> dict[str, Any]:
    total = total_usage(dones, n)
    return {
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "total_tokens": total.prompt_tokens + total.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(done.cached_tokens for done in dones[::n])},
    }
