"""An upstream OpenAI-compatible server (vLLM, llama-server, Ollama, Groq, OpenAI) over aiohttp.

Bodies go out as the client sent them and SSE comes back as raw bytes, relayed as they arrive: the
proxy never parses or re-encodes a completion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from app.backends.base import BackendResponse, BackendStream, Turn
from app.backends.sse import UpstreamStream, usage_of
from app.errors import BackendNotReady, BadUpstreamResponse, UpstreamError, UpstreamHTTPError
from app.limits.backoff import Backoff
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.estimate import estimate_prompt_tokens
from app.limits.headers import parse_budget, parse_retry_after
from app.limits.limiter import UpstreamLimiter
from app.metrics import Metrics
from app.schemas import CompletionRequest

log = logging.getLogger("app.backends.proxy")

# Headers of an upstream refusal that a client needs to act on it.
_PASSED_HEADERS = ("retry-after", "retry-after-ms")
_PASSED_PREFIX = "x-ratelimit-"
_HEALTH_TIMEOUT = 2.0
_ERROR_EXCERPT = 300  # bytes of an upstream 5xx body quoted in our 502 message
_RETRIED_STATUSES = frozenset({429, 502, 503, 504})
_PAUSE_WITHOUT_RETRY_AFTER = 1.0  # seconds dispatch pauses after a 429 that does not say how long


def without_credentials(url: str) -> str:
    """`url` without its user:password part, for logs and status."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _may_have_arrived(exc: BaseException) -> bool:
    """Whether a failed POST may have reached the upstream: everything but a connection never made."""
    return not isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def _stale_connection(exc: BaseException) -> bool:
    """Whether a POST met a connection the upstream had closed before its body could be written.

    (A hang-up after the body went out is not one: the upstream may have the request, see _may_have_arrived.)
    """
    return isinstance(exc, aiohttp.ClientOSError) and "Can not write request body" in str(exc)


def _passed_headers(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {
        k: v
        for k, v in headers.items()  # type: ignore[union-attr]
        if k.lower() in _PASSED_HEADERS or k.lower().startswith(_PASSED_PREFIX)
    }


class ProxyBackend:
    """Forwards completions to UPSTREAM_BASE_URL through one keep-alive pool sized to the concurrency."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        metrics: Metrics,
        max_retries: int = 0,
        retry_on_timeout: bool = False,
        max_response_bytes: int = 64 * 1024 * 1024,
        backoff: Backoff | None = None,
        limiter: UpstreamLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._base_url = base_url
        self._shown_url = without_credentials(base_url)  # what logs and status may show
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._metrics = metrics
        self._max_retries = max_retries
        self._retry_on_timeout = retry_on_timeout
        self._max_response_bytes = max_response_bytes
        self._backoff = backoff or Backoff(base=0.5, cap=8.0)
        self._limiter = limiter
        self._breaker = breaker
        self._clock = clock
        self._headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    def _scrub(self, text: str) -> str:
        """An error's text with the upstream URL's credentials taken out."""
        return text.replace(self._base_url, self._shown_url) if self._base_url != self._shown_url else text

    async def start(self) -> None:
        """Open the connection pool (inside the running loop, as aiohttp requires)."""
        # A few connections beyond the concurrency, so /v1/models and /ready never wait behind completions.
        connector = aiohttp.TCPConnector(limit=self._pool_size + 4, limit_per_host=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout),
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
        if self._breaker is not None:
            self._breaker.failure()
        if isinstance(exc, aiohttp.ClientConnectorError):
            kind = "connect"
        elif isinstance(exc, asyncio.TimeoutError):
            kind = "timeout"
        else:
            kind = "protocol"
        self._metrics.upstream_error(kind)
        # The operator's log has the details; the client learns what happened, not where (no host, no port).
        log.warning("upstream %s%s failed (%s): %s", self._shown_url, what, kind, self._scrub(str(exc)))
        return UpstreamError(f"the upstream could not be reached or broke off ({kind})", kind=kind)

    def _refusal(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> Exception:
        if status >= 500:
            self._metrics.upstream_error("http_5xx")
            excerpt = body[:_ERROR_EXCERPT].decode("utf-8", "replace")
            log.warning("upstream %s answered %d: %s", self._shown_url, status, excerpt)
            return UpstreamError(f"the upstream answered {status}", kind="http_5xx")
        return UpstreamHTTPError(status, body, content_type, headers)

    async def prepare(self, request: CompletionRequest) -> CompletionRequest:
        """Nothing to do: the client's bytes go upstream as they are."""
        return request

    def prompt_tokens(self, prepared: CompletionRequest) -> int:
        """An estimate from the text (the upstream's tokenizer is out of reach)."""
        return estimate_prompt_tokens(prepared.payload, prepared.kind)

    async def _post(self, request: CompletionRequest, deadline: float) -> aiohttp.ClientResponse:
        """POST the client's body upstream, retrying what may succeed later; the final answer, unread.

        Retried: 429, 502, 503, 504 and failures to connect (a timeout or a broken connection too with
        UPSTREAM_RETRY_ON_TIMEOUT), up to UPSTREAM_MAX_RETRIES times, with full-jitter
        backoff that honours Retry-After, and never past the request's deadline or an open breaker. Nothing
        has reached the client yet: a stream's headers go out only once this returns.
        """
        attempt = 0
        resent = False
        while True:
            try:
                response = await self.session.post(
                    self._base_url + request.path, data=request.body, headers=self._headers
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                if not resent and _stale_connection(exc):
                    # The upstream had closed this kept-alive connection (llama-server closes one after each
                    # stream) before the request could be written: it never arrived, so it is sent again at
                    # once on a fresh connection, and it is no failure of the upstream's.
                    resent = True
                    log.debug("upstream %s had closed a pooled connection; sending again", self._shown_url)
                    continue
                error = self._failure(exc, request.path)
                # A POST that may have reached the upstream is not sent again unless the operator says so: it
                # may be generating already, and a second one would do the work twice.
                retry = self._retry_on_timeout or not _may_have_arrived(exc)
                delay = self._retry_delay(attempt, deadline, None) if retry else None
                if delay is None:
                    raise error from exc
                self._metrics.retried(error.kind)
            else:
                status = response.status
                self._observe(response, request)
                if status not in _RETRIED_STATUSES:
                    return response
                delay = self._retry_delay(attempt, deadline, parse_retry_after(response.headers, time.time()))
                if delay is None:
                    return response
                try:
                    await response.read()  # drained, the connection goes back to the pool
                except (TimeoutError, aiohttp.ClientError):
                    pass
                finally:
                    response.release()
                self._metrics.retried(f"http_{status}")
                log.info("upstream answered %d; retry %d in %.2fs", status, attempt + 1, delay)
            await asyncio.sleep(delay)
            attempt += 1

    def _retry_delay(self, attempt: int, deadline: float, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None if there is to be none."""
        if attempt >= self._max_retries:
            return None
        if self._breaker is not None and self._breaker.state is BreakerState.OPEN:
            return None
        delay = self._backoff.delay(attempt, retry_after)
        if self._clock() + delay >= deadline:
            return None
        return delay

    def _observe(self, response: aiohttp.ClientResponse, request: CompletionRequest) -> None:
        """Tell the breaker the upstream answered, and the limiter what budget it says is left."""
        status = response.status
        if self._breaker is not None:
            if status >= 500:
                self._breaker.failure(hash(request.body))  # counted once per content: see CircuitBreaker
            else:
                self._breaker.success()
        if self._limiter is None:
            return
        headers = response.headers
        if "x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers:
            self._limiter.learn(parse_budget(headers))
        if status == 429:
            retry_after = parse_retry_after(headers, time.time())
            self._limiter.pause(_PAUSE_WITHOUT_RETRY_AFTER if retry_after is None else retry_after)

    async def complete(self, prepared: CompletionRequest, deadline: float, turn: Turn | None = None) -> BackendResponse:
        """POST the client's body upstream and return the whole answer, checked: JSON, at most MAX_RESPONSE_BYTES."""
        request = prepared
        response = await self._post(request, deadline)
        try:
            body = await self._read_whole(response, request.path)
        finally:
            response.release()
        status = response.status
        content_type = response.headers.get("Content-Type", "application/json")
        if status >= 400:
            raise self._refusal(status, body, content_type, _passed_headers(response.headers))
        try:
            answer = orjson.loads(body)  # a small body: microseconds, and the usage comes with it
        except orjson.JSONDecodeError:
            self._metrics.upstream_error("protocol")
            log.warning("upstream %s answered %d with a body that is not JSON: %r", self._shown_url, status, body[:200])
            raise BadUpstreamResponse(f"the upstream answered {status} with a body that is not JSON") from None
        return BackendResponse(status, body, content_type, usage_of(answer))

    async def _read_whole(self, response: aiohttp.ClientResponse, path: str) -> bytes:
        """An answer's whole body, refused (502) past MAX_RESPONSE_BYTES rather than held in memory."""
        limit = self._max_response_bytes
        length = response.content_length
        try:
            if length is not None and length <= limit:
                return await response.read()
            parts: list[bytes] = []
            size = 0
            if length is None:
                async for data in response.content.iter_any():
                    size += len(data)
                    if size > limit:
                        break
                    parts.append(data)
            if length is not None or size > limit:
                response.close()  # the rest is never read: this connection cannot serve another request
                self._metrics.upstream_error("protocol")
                log.warning("upstream %s answer over MAX_RESPONSE_BYTES (%d bytes)", self._shown_url, limit)
                raise BadUpstreamResponse(f"the upstream's answer is over {limit} bytes (MAX_RESPONSE_BYTES)")
            return b"".join(parts)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, path) from exc

    async def stream(self, prepared: CompletionRequest, deadline: float, turn: Turn | None = None) -> BackendStream:
        """POST a streaming request; return once the upstream has answered 2xx."""
        request = prepared
        response = await self._post(request, deadline)
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
        return UpstreamStream(response, lambda exc: self._failure(exc, request.path))

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
            log.info("upstream %s not ready: %s", self._shown_url, self._scrub(str(exc)) or type(exc).__name__)
            raise BackendNotReady("the upstream does not answer") from None
        if status >= 300:
            raise BackendNotReady(f"the upstream answered GET /models with {status}")
