"""An upstream OpenAI-compatible server (vLLM, llama-server, Ollama, Groq, OpenAI) over aiohttp.

Bodies go out as the client sent them and SSE comes back as raw bytes, relayed as they arrive: the
proxy never parses or re-encodes a completion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import aiohttp

from app.backends.base import BackendResponse
from app.errors import BackendNotReady, UpstreamError, UpstreamHTTPError
from app.metrics import Metrics
from app.schemas import CompletionRequest

log = logging.getLogger("app.backends.proxy")

# Headers of an upstream refusal that a client needs to act on it.
_PASSED_HEADERS = ("retry-after", "retry-after-ms")
_PASSED_PREFIX = "x-ratelimit-"
_HEALTH_TIMEOUT = 2.0
_ERROR_EXCERPT = 300  # bytes of an upstream 5xx body quoted in our 502 message


def _passed_headers(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {
        k: v
        for k, v in headers.items()  # type: ignore[union-attr]
        if k.lower() in _PASSED_HEADERS or k.lower().startswith(_PASSED_PREFIX)
    }


class ProxyBackend:
    """Forwards completions to UPSTREAM_BASE_URL through one keep-alive pool sized to the concurrency."""

    def __init__(self, *, base_url: str, api_key: str, pool_size: int, connect_timeout: float, metrics: Metrics):
        self._base_url = base_url
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._metrics = metrics
        self._headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool (inside the running loop, as aiohttp requires)."""
        # A few connections beyond the concurrency, so /v1/models and /ready never wait behind completions.
        connector = aiohttp.TCPConnector(limit=self._pool_size + 4, limit_per_host=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            skip_auto_headers=("User-Agent",),
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ProxyBackend.start() was not awaited")
        return self._session

    async def aclose(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _failure(self, exc: BaseException, what: str) -> UpstreamError:
        if isinstance(exc, aiohttp.ClientConnectorError):
            kind = "connect"
        elif isinstance(exc, asyncio.TimeoutError):
            kind = "timeout"
        else:
            kind = "protocol"
        self._metrics.upstream_error(kind)
        log.warning("upstream %s failed (%s): %s", what, kind, exc)
        return UpstreamError(f"the upstream could not be reached or broke off ({kind}): {exc}", kind=kind)

    def _refusal(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> Exception:
        if status >= 500:
            self._metrics.upstream_error("http_5xx")
            excerpt = body[:_ERROR_EXCERPT].decode("utf-8", "replace")
            return UpstreamError(f"the upstream answered {status}: {excerpt}", kind="http_5xx")
        return UpstreamHTTPError(status, body, content_type, headers)

    async def complete(self, request: CompletionRequest) -> BackendResponse:
        """POST the client's body upstream and return the whole answer."""
        try:
            async with self.session.post(
                self._base_url + request.path, data=request.body, headers=self._headers
            ) as response:
                body = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "application/json")
                passed = _passed_headers(response.headers) if status >= 400 else {}
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, request.path) from exc
        if status >= 400:
            raise self._refusal(status, body, content_type, passed)
        return BackendResponse(status, body, content_type)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[bytes, None]:
        """POST a streaming request; return once the upstream has answered 2xx."""
        try:
            response = await self.session.post(self._base_url + request.path, data=request.body, headers=self._headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, request.path) from exc
        if response.status >= 400:
            try:
                body = await response.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise self._failure(exc, request.path) from exc
            finally:
                response.release()
            raise self._refusal(
                response.status,
                body,
                response.headers.get("Content-Type", "application/json"),
                _passed_headers(response.headers),
            )
        return self._relay(response, request.path)

    async def _relay(self, response: aiohttp.ClientResponse, what: str) -> AsyncGenerator[bytes, None]:
        complete = False
        try:
            async for chunk in response.content.iter_any():
                yield chunk
            complete = True
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, what) from exc
        finally:
            if complete:
                response.release()  # back to the pool for the next request
            else:
                response.close()  # stop the upstream's work: the client is gone or the request was aborted

    async def models(self) -> BackendResponse:
        """The upstream's own model list."""
        try:
            async with self.session.get(self._base_url + "/models", headers=self._headers) as response:
                body = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "application/json")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, "/models") from exc
        if status >= 400:
            raise self._refusal(status, body, content_type, {})
        return BackendResponse(status, body, content_type)

    async def health(self) -> None:
        """Ready when the upstream lists its models within two seconds."""
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                async with self.session.get(self._base_url + "/models", headers=self._headers) as response:
                    await response.read()
                    status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BackendNotReady(f"the upstream at {self._base_url} does not answer: {exc}") from None
        if status >= 300:
            raise BackendNotReady(f"the upstream at {self._base_url} answered GET /models with {status}")
