"""A completion request as the gateway parses it: the few fields it relies on, checked, and the client's bytes.

Completion bodies are not parsed into models: the gateway checks the fields it needs and forwards the
client's bytes untouched, so new OpenAI parameters keep working and the proxy path stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.errors import InvalidRequest
from app.types import INTERACTIVE, CompletionKind, Priority

# The one table of completion paths: the HTTP routes, the access log, the OpenAPI description and the endpoints a
# batch may name are all read from it.
COMPLETION_ROUTES: dict[str, CompletionKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
_PATHS: dict[CompletionKind, str] = {kind: path.removeprefix("/v1") for path, kind in COMPLETION_ROUTES.items()}
EMBEDDING_FORMATS = ("float", "base64")
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
MAX_CHOICES = 128  # OpenAI's limit on n


@dataclass(slots=True, frozen=True)
class CompletionRequest:
    """One request of COMPLETION_ROUTES (a chat or text completion, or embeddings), checked; it does not change
    after parsing."""

    kind: CompletionKind
    body: bytes  # what is forwarded upstream: the client's bytes, less the gateway's own `priority` field
    payload: dict[str, Any] = field(repr=False)
    model: str | None
    stream: bool
    max_tokens: int | None
    body_priority: Priority | None
    service_tier: str | None = None  # OpenAI's field as the client sent it (see SERVICE_TIERS)
    priority: Priority | None = None  # the priority it is served at, once the API layer has decided it
    n: int = 1  # choices asked for (completions), per prompt
    prompts: int = 1  # prompts it holds (a text completion's `prompt` may be a list of them)

    @property
    def choices(self) -> int:
        """The choices of its answer: n for each prompt."""
        return self.n * self.prompts

    def for_model(self, model: str) -> CompletionRequest:
        """The same request for `model`, the name its backend serves (an alias resolved)."""
        payload = {**self.payload, "model": model}
        return dataclasses.replace(self, body=orjson.dumps(payload), payload=payload, model=model)

    @property
    def path(self) -> str:
        """The OpenAI path this request goes to, below /v1."""
        return _PATHS[self.kind]


# OpenAI's `service_tier` as the queue's priorities (None: DEFAULT_PRIORITY), and the tier each priority reports.
SERVICE_TIERS: dict[str, Priority | None] = {
    "priority": Priority.HIGH,
    "scale": Priority.NORMAL,
    "default": None,
    "auto": None,
    "flex": Priority.LOW,
}
SERVED_TIERS = {Priority.HIGH: "priority", Priority.NORMAL: "default", Priority.LOW: "flex", Priority.BATCH: "flex"}


def _service_tier(value: object) -> str:
    if isinstance(value, str) and value in SERVICE_TIERS:
        return value
    allowed = ", ".join(f"'{tier}'" for tier in SERVICE_TIERS)
    raise InvalidRequest(f"service_tier must be one of {allowed}, not {value!r}", param="service_tier")


def parse_priority(value: object, param: str) -> Priority:
    """A priority from a header or body value, or a 400 that lists the allowed values."""
    if isinstance(value, str):
        try:
            priority = Priority(value.strip().lower())
        except ValueError:
            pass
        else:
            if priority in INTERACTIVE:
                return priority
    raise InvalidRequest(f"{param} must be one of 'high', 'normal', 'low', not {value!r}", param=param)


def _optional_int(payload: dict[str, Any], name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # the JSON parser's way with integers past 64 bits
        raise InvalidRequest(f"{name} is too large ({value:.0f})", param=name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, not {type(value).__name__}", param=name)
    if value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}, not {value}", param=name)
    if maximum is not None and value > maximum:
        raise InvalidRequest(
            f"{name} must be at most {maximum} on this gateway (MAX_TOKENS_LIMIT), not {value}",
            param=name,
            code="max_tokens_exceeded",
        )
    return value


def _check_number(payload: dict[str, Any], name: str, low: float, high: float) -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number, not {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, not {value}", param=name)


def _check_messages(payload: dict[str, Any]) -> None:
    messages = payload.get("messages")
    if messages is None:
        raise InvalidRequest("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of message objects", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{index}] must be an object with a string 'role'", param=f"messages[{index}]"
            )


def _check_prompt(payload: dict[str, Any]) -> int:
    """How many prompts a text completion's `prompt` holds (token ids are one)."""
    prompt = payload.get("prompt")
    if prompt is None:
        raise InvalidRequest("prompt is required", param="prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return 1
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    raise InvalidRequest("prompt must be a string, a list of strings or a list of token ids", param="prompt")


def _check_embedding(payload: dict[str, Any]) -> None:
    """`input` as OpenAI takes it: a string, a list of strings, token ids, or lists of token ids; none empty."""
    value = payload.get("input")
    if value is None:
        raise InvalidRequest("input is required", param="input")
    if payload.get("stream") is not None:
        raise InvalidRequest("embeddings do not stream", param="stream")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        items = []
    if not items or len(items) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"input must be a non-empty string, list of strings, token ids or lists of token ids "
            f"(at most {MAX_EMBEDDING_INPUTS})",
            param="input",
        )
    for item in items:
        strings = isinstance(item, str)
        ids = isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        if not (strings or ids) or not item:
            raise InvalidRequest("each input must be a non-empty string or list of token ids", param="input")
    encoding = payload.get("encoding_format")
    if encoding is not None and encoding not in EMBEDDING_FORMATS:
        raise InvalidRequest(f"encoding_format must be 'float' or 'base64', not {encoding!r}", param="encoding_format")
    _optional_int(payload, "dimensions", 1)


PriorityOf = Callable[[Priority | None, str | None], Priority]  # (the body's priority, its tier) -> served at


def parse_completion_request(
    raw: bytes,
    kind: CompletionKind,
    max_tokens_limit: int | None = None,
    forward_service_tier: bool = False,
    priority_of: PriorityOf | None = None,
) -> CompletionRequest:
    """Check the fields the gateway relies on; any other field is the backend's business.

    `max_tokens_limit` (MAX_TOKENS_LIMIT) bounds max_tokens and max_completion_tokens. `service_tier` is read
    for the queue, and taken out of what goes upstream unless `forward_service_tier` (FORWARD_SERVICE_TIER).
    `priority_of` decides the priority it is served at from the body's `priority` and `service_tier` (the
    request is built once: a copy with it would cost as much as the parse).
    """
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")

    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string", param="model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be a boolean, not {type(stream).__name__}", param="stream")
    max_tokens = _optional_int(payload, "max_tokens", 1, max_tokens_limit)
    completion_tokens = _optional_int(payload, "max_completion_tokens", 1, max_tokens_limit)
    n = _optional_int(payload, "n", 1)
    if n is not None and n > MAX_CHOICES:
        raise InvalidRequest(f"n must be at most {MAX_CHOICES}, not {n}", param="n")
    _check_number(payload, "temperature", 0.0, 2.0)
    _check_number(payload, "top_p", 0.0, 1.0)
    prompts = 1
    if kind == "chat":
        _check_messages(payload)
    elif kind == "completion":
        prompts = _check_prompt(payload)
    else:
        _check_embedding(payload)
        stream = False

    body_priority = None
    body = raw
    service_tier = None
    rewritten = False
    if "priority" in payload:
        body_priority = parse_priority(payload.pop("priority"), "priority")
        rewritten = True  # the upstream must not see a field it does not know
    if "service_tier" in payload:
        service_tier = _service_tier(payload["service_tier"])
        if not forward_service_tier:
            del payload["service_tier"]
            rewritten = True
    if rewritten:
        body = orjson.dumps(payload)
    return CompletionRequest(
        kind=kind,
        body=body,
        payload=payload,
        model=model,
        stream=stream,
        max_tokens=completion_tokens if completion_tokens is not None else max_tokens,
        body_priority=body_priority,
        service_tier=service_tier,
        priority=None if priority_of is None else priority_of(body_priority, service_tier),
        n=(n or 1) if kind != "embedding" else 1,
        prompts=prompts,
    )
