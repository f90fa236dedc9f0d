"""Backends: the models the gateway can front."""

from __future__ import annotations

from app.backends.base import Backend, BackendResponse, BackendStream, Usage
from app.backends.llama import LlamaBackend
from app.backends.proxy import ProxyBackend

__all__ = ["Backend", "BackendResponse", "BackendStream", "LlamaBackend", "ProxyBackend", "Usage"]
