"""Backends: the models the gateway can front."""

from __future__ import annotations

from app.backends.base import Backend, BackendResponse
from app.backends.proxy import ProxyBackend
from app.metrics import Metrics
from app.settings import Settings


def build_backend(settings: Settings, metrics: Metrics) -> Backend:
    """The backend that BACKEND names."""
    return ProxyBackend(
        base_url=settings.upstream_base_url,
        api_key=settings.upstream_api_key,
        pool_size=settings.max_concurrent_requests,
        connect_timeout=settings.upstream_connect_timeout,
        metrics=metrics,
    )


__all__ = ["Backend", "BackendResponse", "build_backend"]
