"""Every setting of the gateway: read from the environment and an optional .env file, typed and bounded.

The fields live in one group per part of the gateway (backends, queue, server, replicas, batches); `Settings`
is all of them together, read at once, so code reads `settings.max_queue_size` whatever group it belongs to.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.settings.backends import BackendSettings
from app.settings.batches import BatchSettings
from app.settings.fields import (
    BaseUrl,
    ChatTemplate,
    FilePath,
    QueueFullBehavior,
    WebhookSecret,
    webhook_key,
    window_seconds,
)
from app.settings.queue import QueueSettings
from app.settings.replicas import ReplicaSettings
from app.settings.server import ServerSettings

__all__ = [
    "BaseUrl",
    "ChatTemplate",
    "FilePath",
    "QueueFullBehavior",
    "Settings",
    "SettingsError",
    "WebhookSecret",
    "load_settings",
    "unknown_variables",
    "webhook_key",
    "window_seconds",
]


# The groups' fields follow one another in the reverse of this order: the docs' table lists the backend first.
class Settings(BatchSettings, ReplicaSettings, QueueSettings, ServerSettings, BackendSettings, BaseSettings):
    """The gateway's configuration; see the README's settings table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)


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
