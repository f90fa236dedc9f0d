"""Backends: the models the gateway can front."""

from __future__ import annotations

from typing import Any

from app.backends.base import Backend, BackendResponse, BackendStream, Usage
from app.backends.llama import LlamaBackend
from app.backends.proxy import ProxyBackend
from app.limits.backoff import Backoff
from app.limits.breaker import CircuitBreaker
from app.limits.limiter import UpstreamLimiter
from app.metrics import Metrics
from app.settings import Settings


def build_backend(
    settings: Settings,
    metrics: Metrics,
    limiter: UpstreamLimiter | None = None,
    breaker: CircuitBreaker | None = None,
) -> Backend[Any]:
    """The backend that BACKEND names; a proxy informs the limiter and the breaker of every upstream answer."""
    if settings.backend == "local":
        return LlamaBackend(
            model_path=settings.model_path,
            alias=settings.model_alias,
            n_ctx=settings.n_ctx,
            n_seq=settings.max_concurrent_requests,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            chat_template=settings.chat_template,
            default_max_tokens=settings.default_max_tokens,
        )
    return ProxyBackend(
        base_url=settings.upstream_base_url,
        api_key=settings.upstream_api_key,
        pool_size=settings.max_concurrent_requests,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        metrics=metrics,
        max_retries=settings.upstream_max_retries,
        retry_on_timeout=settings.upstream_retry_on_timeout,
        max_response_bytes=settings.max_response_bytes,
        backoff=Backoff(base=settings.upstream_retry_backoff, cap=settings.upstream_retry_max_backoff),
        limiter=limiter,
        breaker=breaker,
    )


__all__ = ["Backend", "BackendResponse", "BackendStream", "Usage", "build_backend"]
