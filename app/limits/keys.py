"""Client keys: the keys file, and each key's account: its policy, its rate budgets, its requests waiting."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import KeyRateLimited
from app.limits.buckets import TokenBucket
from app.settings import BaseUrl, WebhookSecret
from app.types import INTERACTIVE, Priority


class KeyEntry(BaseModel):
    """One key of API_KEYS_FILE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, description="The bearer token the client sends.")
    name: str = Field(min_length=1, max_length=128, description="Shown in logs, metrics and status; never the key.")
    max_priority: Priority = Field(default=Priority.HIGH, description="The highest priority this key may use.")
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute this key may send.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute (prompt + max_tokens) it may use.")
    max_queued: int | None = Field(default=None, ge=1, description="Most requests it may have waiting at once.")
    admin: bool = Field(default=False, description="Sees and cancels every key's requests, not only its own.")
    webhook_url: BaseUrl | None = Field(
        default=None, description="Where this key's batch and background request events are posted."
    )
    webhook_secret: WebhookSecret | None = Field(
        default=None, description="The `whsec_...` secret they are signed with."
    )

    @field_validator("max_priority", mode="before")
    @classmethod
    def _interactive(cls, value: object) -> object:
        if isinstance(value, str) and value not in {p.value for p in INTERACTIVE}:
            raise ValueError(f"must be 'high', 'normal' or 'low', not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_webhook(self) -> KeyEntry:
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("webhook_url and webhook_secret go together")
        return self


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry]


class KeysFileError(Exception):
    """API_KEYS_FILE cannot be read or is not valid; str() says where."""


def load_keys_file(path: str) -> list[KeyEntry]:
    """The keys of a YAML or JSON file: `{"keys": [{"key", "name", ...}]}` or the bare list."""
    file = Path(path)
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise KeysFileError(f"{path}: {exc}") from None
    if isinstance(data, list):
        data = {"keys": data}
    try:
        entries = _KeysFile.model_validate(data).keys
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KeysFileError(f"{path}: {problems}") from None
    for attribute in ("key", "name"):
        seen: set[str] = set()
        for entry in entries:
            value = getattr(entry, attribute)
            if value in seen:
                shown = entry.name if attribute == "key" else value
                raise KeysFileError(f"{path}: {attribute} of {shown!r} appears more than once")
            seen.add(value)
    return entries


@dataclass(slots=True)
class KeyAccount:
    """A client key's live account: its policy, its rate budgets and how many of its requests wait.

    Everything the gateway counts per key goes through these methods: spend() and refund() at admission,
    joined() and left() around the queue, settle() when the answer's real usage is known.
    """

    name: str
    max_priority: Priority
    max_queued: int | None
    requests: TokenBucket | None
    tokens: TokenBucket | None
    waiting: int = 0
    admin: bool = False  # sees and cancels every key's requests
    webhook: tuple[str, str] | None = None  # (url, secret) its events are posted to, from the keys file

    @classmethod
    def build(cls, entry: KeyEntry, clock: Callable[[], float] = time.monotonic) -> KeyAccount:
        return cls(
            name=entry.name,
            max_priority=entry.max_priority,
            max_queued=entry.max_queued,
            requests=TokenBucket(entry.rpm, 60.0, clock) if entry.rpm else None,
            tokens=TokenBucket(entry.tpm, 60.0, clock) if entry.tpm else None,
            admin=entry.admin,
            webhook=(entry.webhook_url, entry.webhook_secret) if entry.webhook_url and entry.webhook_secret else None,
        )

    @classmethod
    def unlimited(cls, name: str) -> KeyAccount:
        return cls(name=name, max_priority=Priority.HIGH, max_queued=None, requests=None, tokens=None)

    def for_batch(self) -> KeyAccount:
        """The account a batch line is charged to: the same rate budgets, but a waiting count of its own, so
        batch lines (bounded by BATCH_MAX_IN_FLIGHT) never fill the key's max_queued."""
        return dataclasses.replace(self, max_queued=None, waiting=0)

    @property
    def counts_tokens(self) -> bool:
        """Whether requests of this key need a token estimate (it has a TPM budget)."""
        return self.tokens is not None

    @property
    def limited(self) -> bool:
        """Whether the key has any budget or queue limit to keep (a lowered priority needs no accounting)."""
        return self.requests is not None or self.tokens is not None or self.max_queued is not None

    def allowed_priority(self, asked: Priority) -> Priority:
        """`asked`, lowered to the key's highest allowed priority."""
        return asked if asked.rank >= self.max_priority.rank else self.max_priority

    def spend(self, cost: int) -> None:
        """Spend one request and `cost` tokens of the key's budgets, or raise 429 saying when to come back."""
        wait_requests = self.requests.wait(1) if self.requests is not None else 0.0
        wait_tokens = self.tokens.wait(cost) if self.tokens is not None else 0.0
        if wait_requests > 0 or wait_tokens > 0:
            which = "requests" if wait_requests >= wait_tokens else "tokens"
            limit = self.requests if which == "requests" else self.tokens
            assert limit is not None
            raise KeyRateLimited(
                f"rate limit reached for key {self.name!r}: {int(limit.limit)} {which} per minute; "
                f"retry in {max(wait_requests, wait_tokens):.1f}s",
                retry_after=max(wait_requests, wait_tokens),
                headers=self.headers(),
            )
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(cost)

    def refund(self, cost: int) -> None:
        """Give back what spend() took for a request that was then refused."""
        if self.requests is not None:
            self.requests.give(1)
        if self.tokens is not None:
            self.tokens.give(cost)

    def settle(self, charged: int, used: int) -> None:
        """Give back tokens the estimate over-charged, or take what it missed."""
        if self.tokens is not None:
            self.tokens.settle(charged, used)

    def queue_full(self) -> bool:
        """Whether the key already has its most requests waiting (max_queued)."""
        return self.max_queued is not None and self.waiting >= self.max_queued

    def joined(self) -> None:
        """One of the key's requests started waiting."""
        self.waiting += 1

    def left(self) -> None:
        """One of the key's requests stopped waiting (dispatched or ended)."""
        self.waiting -= 1

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for this key's budgets."""
        headers = {}
        for which, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            headers[f"x-ratelimit-limit-{which}"] = str(int(bucket.limit))
            headers[f"x-ratelimit-remaining-{which}"] = str(bucket.remaining())
            headers[f"x-ratelimit-reset-{which}"] = f"{math.ceil(bucket.reset_in() * 1000)}ms"
        return headers
