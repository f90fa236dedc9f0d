"""Shared fixtures: the fake upstream and a factory for real gateways on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import RunningGateway, gateway_settings


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def start_gateway(upstream: FakeUpstream) -> Iterator[Callable[..., RunningGateway]]:
    """start_gateway(MAX_CONCURRENT_REQUESTS=1, ...) -> a running gateway in front of the fake upstream."""
    started: list[RunningGateway] = []

    def start(**overrides: Any) -> RunningGateway:
        values = {"backend": "proxy", "upstream_base_url": upstream.base_url}
        values.update({k.lower(): v for k, v in overrides.items()})
        gateway = RunningGateway(gateway_settings(**values)).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def start_local() -> Iterator[Callable[..., RunningGateway]]:
    """start_local(MAX_CONCURRENT_REQUESTS=4, ...) -> a running gateway on the bundled SmolLM2 model."""
    started: list[RunningGateway] = []

    def start(**overrides: Any) -> RunningGateway:
        values: dict[str, Any] = {"backend": "local", "n_ctx": 512}
        values.update({k.lower(): v for k, v in overrides.items()})
        gateway = RunningGateway(gateway_settings(**values)).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
