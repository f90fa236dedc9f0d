"""The field types and checks that the settings, the backends file and the keys file share."""

from __future__ import annotations

import base64
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator


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
