"""BACKENDS_FILE: the backends of a fleet, checked; and the fleet of one the settings describe without it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.settings import BaseUrl, ChatTemplate, FilePath, Settings

# A backend's name is a metric label and a log word: short, and nothing a query language must escape.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Shown in status, logs and the `backend` metric label.")
    max_concurrent: int = Field(default=4, ge=1, le=4096, description="Requests this backend runs at once.")
    models: tuple[str, ...] | None = Field(
        default=None, description="The model names it serves; a proxy without them is asked GET /v1/models."
    )
    reserved_high_slots: int | None = Field(
        default=None, ge=0, description="Slots only high-priority requests may take; unset: RESERVED_HIGH_SLOTS."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _check_reserved(self) -> _Entry:
        if self.reserved_high_slots is not None and self.reserved_high_slots >= self.max_concurrent:
            raise ValueError("reserved_high_slots must be below max_concurrent: other requests need a slot too")
        return self

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or any(not model.strip() for model in value)):
            raise ValueError("must list at least one non-empty model name (or be left out)")
        return value


class ProxyEntry(_Entry):
    """A remote OpenAI-compatible server."""

    type: Literal["proxy"]
    base_url: BaseUrl = Field(description="Base URL including /v1.")
    api_key: str = Field(default="", description="Bearer key sent to it.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the key instead.")
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute sent to it.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute sent to it.")
    connect_timeout: float | None = Field(default=None, gt=0, le=600)
    read_timeout: float | None = Field(default=None, gt=0, le=86_400)
    max_retries: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Retries on this same backend; unset: UPSTREAM_MAX_RETRIES when it is alone in its "
        "models' pools, else 0 (a failed request goes to another member instead).",
    )
    retry_on_timeout: bool | None = None
    probe_interval: float = Field(
        default=2.0, gt=0, le=3600, description="Seconds between GET /v1/models probes while it is down."
    )

    @model_validator(mode="after")
    def _check_key(self) -> ProxyEntry:
        if self.api_key and self.api_key_env:
            raise ValueError("set api_key or api_key_env, not both")
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ValueError(f"api_key_env names {self.api_key_env}, which is not set in the environment")
        return self

    @property
    def key(self) -> str:
        """The bearer key sent to it, read from the environment when api_key_env names it."""
        return os.environ[self.api_key_env] if self.api_key_env else self.api_key


class LocalEntry(_Entry):
    """A GGUF model run in process."""

    type: Literal["local"]
    model_path: FilePath | None = Field(default=None, description="GGUF file; unset: the bundled SmolLM2.")
    n_ctx: int = Field(default=2048, ge=64, le=1_048_576)
    n_threads: int | None = Field(default=None, ge=1, le=1024)
    n_gpu_layers: int = Field(default=-1, ge=-1, le=100_000)
    chat_template: ChatTemplate | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    preemption: bool | None = Field(default=None, description="Park lower-priority work for high; unset: PREEMPTION.")


BackendEntry = Annotated[ProxyEntry | LocalEntry, Field(discriminator="type")]


class FleetConfig(BaseModel):
    """The whole file: the backends, and aliases from public model names to served ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: tuple[BackendEntry, ...] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict)
    # False for the fleet of one the settings describe: it keeps today's behaviour (any model name is
    # accepted, /v1/models is the backend's own, an open breaker waits for its cooldown).
    from_file: bool = True

    @model_validator(mode="after")
    def _check_names(self) -> FleetConfig:
        seen: set[str] = set()
        for entry in self.backends:
            if entry.name in seen:
                raise ValueError(f"backend name {entry.name!r} appears more than once")
            seen.add(entry.name)
        declared = {model for entry in self.backends for model in entry.models or ()}
        discovers = any(entry.models is None for entry in self.backends)
        for alias, served in self.aliases.items():
            if alias in declared:
                raise ValueError(f"alias {alias!r} is also a model a backend serves")
            if served not in declared and not discovers:
                raise ValueError(f"alias {alias!r} points to {served!r}, which no backend serves")
        return self


class BackendsFileError(Exception):
    """BACKENDS_FILE cannot be read or is not valid; str() names the file, the entry and the problem."""


def load_backends_file(path: str) -> FleetConfig:
    """The fleet of a YAML or JSON file: `{"backends": [...], "aliases": {...}}`."""
    file = Path(path)
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BackendsFileError(f"{path}: {' '.join(str(exc).split())}") from None  # one line, as promised
    if isinstance(data, list):
        data = {"backends": data}
    if not isinstance(data, dict):
        raise BackendsFileError(f"{path}: must hold a mapping with a 'backends' list")
    try:
        return FleetConfig.model_validate({**data, "from_file": True})
    except ValidationError as exc:
        raise BackendsFileError(f"{path}: {_describe(exc, data)}") from None


def _describe(exc: ValidationError, data: dict[str, object]) -> str:
    """pydantic's report as 'backend "name" (entry N): field: problem; ...'."""
    backends = data.get("backends")
    problems = []
    for error in exc.errors():
        loc = list(error["loc"])
        where = ".".join(str(part) for part in loc) or "file"
        if len(loc) >= 2 and loc[0] == "backends" and isinstance(loc[1], int):
            entry = backends[loc[1]] if isinstance(backends, list) and loc[1] < len(backends) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            # The discriminated union puts the type in the path ('backends.0.proxy.base_url'): drop it.
            rest = [str(part) for part in loc[2:] if part not in ("proxy", "local")]
            label = f"backend {name!r}" if isinstance(name, str) else f"backend #{loc[1] + 1}"
            where = f"{label}: {'.'.join(rest)}" if rest else label
        problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def fleet_of_one(settings: Settings) -> FleetConfig:
    """The fleet BACKEND, UPSTREAM_BASE_URL, MODEL_PATH and MAX_CONCURRENT_REQUESTS describe."""
    entry: ProxyEntry | LocalEntry
    if settings.backend == "proxy":
        entry = ProxyEntry.model_construct(
            name="upstream",
            type="proxy",
            max_concurrent=settings.max_concurrent_requests,
            models=None,
            reserved_high_slots=settings.reserved_high_slots,
            base_url=settings.upstream_base_url,
            api_key=settings.upstream_api_key,
            api_key_env=None,
            rpm=settings.rate_limit_rpm,
            tpm=settings.rate_limit_tpm,
            connect_timeout=None,
            read_timeout=None,
            max_retries=settings.upstream_max_retries,
            retry_on_timeout=None,
            probe_interval=2.0,
        )
    else:
        entry = LocalEntry.model_construct(
            name="local",
            type="local",
            max_concurrent=settings.max_concurrent_requests,
            models=None,
            reserved_high_slots=settings.reserved_high_slots,
            preemption=settings.preemption,
            model_path=settings.model_path,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            chat_template=settings.chat_template,
            rpm=settings.rate_limit_rpm,
            tpm=settings.rate_limit_tpm,
        )
    return FleetConfig.model_construct(backends=(entry,), aliases={}, from_file=False)
