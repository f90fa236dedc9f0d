"""The settings of replicas: the Redis they share and what happens when it cannot be reached."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class ReplicaSettings(BaseModel):
    """Gateways that name one Redis share their queue, slots, quotas and request ids."""

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

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value
