"""The settings of work kept on disk: files, batches, background requests and their webhooks."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from app.settings.fields import BaseUrl, WebhookSecret, window_seconds


class BatchSettings(BaseModel):
    """Where the data directory is, and the bounds of batches, background results and webhook deliveries."""

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

    @field_validator("batch_completion_windows", mode="before")
    @classmethod
    def _split_windows(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(window.strip() for window in value.split(",") if window.strip())
        if isinstance(value, tuple | list):
            for window in value:
                window_seconds(window)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _check_webhook(self) -> Self:
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("WEBHOOK_URL and WEBHOOK_SECRET go together: set both or neither")
        return self
