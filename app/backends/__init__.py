"""Backends: the models the gateway can front."""

from __future__ import annotations

from app.backends.base import Backend, BackendResponse
from app.backends.llama import LlamaBackend
from app.backends.proxy import ProxyBackend
from app.metrics import Metrics
from app.settings import Settings


def build_backend(settings: Settings, metrics: Metrics) -> Backend:
    """The backend that BACKEND names."""
    if settings.backend == "local":
        return LlamaBackend(
            model_path=settings.model_path,
            alias=settings.model_alias,
            n_ctx=settings.n_ctx,
            n_seq=settings.max_concurrent_requests,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            chat_template=settings.chat_template,
        )
    return ProxyBackend(
        base_url=settings.upstream_base_url,
        api_key=settings.upstream_api_key,
        pool_size=settings.max_concurrent_requests,
        connect_timeout=settings.upstream_connect_timeout,
        metrics=metrics,
    )


__all__ = ["Backend", "BackendResponse", "build_backend"]
