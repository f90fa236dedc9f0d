"""Shared fixtures: the fake upstream and a factory for real gateways on loopback ports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from testkit.gateway import SETTING_VARIABLES, RunningGateway, gateway_settings
from testkit.upstream import FakeUpstream


@pytest.fixture(autouse=True, scope="session")
def _no_settings_from_the_shell() -> Iterator[None]:
    """A setting exported in the developer's shell must not change what the tests see."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.upper() in SETTING_VARIABLES:
                patch.delenv(name)
        yield


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@contextmanager
def _gateways(defaults: dict[str, Any]) -> Iterator[Callable[..., RunningGateway]]:
    """A factory of running gateways with these settings as defaults; all are stopped at the end."""
    started: list[RunningGateway] = []

    def start(**overrides: Any) -> RunningGateway:
        values = {**defaults, **{k.lower(): v for k, v in overrides.items()}}
        gateway = RunningGateway(gateway_settings(**values)).start()
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.stop()


@pytest.fixture
def start_gateway(upstream: FakeUpstream) -> Iterator[Callable[..., RunningGateway]]:
    """start_gateway(MAX_CONCURRENT_REQUESTS=1, ...) -> a running gateway in front of the fake upstream."""
    with _gateways({"backend": "proxy", "upstream_base_url": upstream.base_url}) as start:
        yield start


@pytest.fixture
def start_local() -> Iterator[Callable[..., RunningGateway]]:
    """start_local(MAX_CONCURRENT_REQUESTS=4, ...) -> a running gateway on the bundled SmolLM2 model."""
    with _gateways({"backend": "local", "n_ctx": 512}) as start:
        yield start


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
