"""The settings of the queue: slots, bounds, timeouts, priorities and the client keys."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from app.settings.fields import FilePath, QueueFullBehavior
from app.types import INTERACTIVE, Priority


class QueueSettings(BaseModel):
    """How many requests run and wait, for how long, in which order, and whose keys are let in."""

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
    request_history_size: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="Finished requests kept for `GET /v1/queue/request/{id}`; the oldest are forgotten first.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("default_priority", mode="before")
    @classmethod
    def _interactive_default(cls, value: object) -> object:
        if isinstance(value, str) and value not in {p.value for p in INTERACTIVE}:
            raise ValueError(f"Input should be 'high', 'normal' or 'low', not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_reserved_slots(self) -> Self:
        if self.reserved_high_slots >= self.max_concurrent_requests:
            raise ValueError(
                f"RESERVED_HIGH_SLOTS ({self.reserved_high_slots}) must be below MAX_CONCURRENT_REQUESTS "
                f"({self.max_concurrent_requests}): other requests need a slot too"
            )
        return self
