"""The settings of the HTTP server: where it listens, what a connection may send, draining and logs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ServerSettings(BaseModel):
    """The listening socket, the bounds on what a client connection may send and hold, and the log."""

    host: str = Field(default="127.0.0.1", description="Address to listen on (`0.0.0.0` in a container).")
    port: int = Field(default=8091, ge=1, le=65535, description="Port to listen on.")
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
    drain_timeout: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds running requests get to finish after SIGTERM."
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
