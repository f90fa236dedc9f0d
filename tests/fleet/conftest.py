"""Fleets of fake upstreams behind one gateway, from a real BACKENDS_FILE."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.gateway import RunningGateway, gateway_settings
from testkit.upstream import FakeUpstream


@pytest.fixture
def upstreams() -> Iterator[list[FakeUpstream]]:
    """Four fake upstreams (tests use as many as they need); each records its peak concurrency."""
    servers = [FakeUpstream().start() for _ in range(4)]
    yield servers
    for server in servers:
        server.stop()


def member(name: str, upstream: FakeUpstream, max_concurrent: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "proxy",
        "base_url": upstream.base_url,
        "max_concurrent": max_concurrent,
        "models": ["m"],
        "probe_interval": 0.1,
        **extra,
    }


StartFleet = Callable[..., RunningGateway]


@pytest.fixture
def start_fleet(tmp_path: Path) -> Iterator[StartFleet]:
    """start_fleet([member(...), ...], aliases={...}, SETTING=value) -> a gateway in front of that fleet."""
    started: list[RunningGateway] = []

    def start(backends: list[dict[str, Any]], aliases: dict[str, str] | None = None, **settings: Any) -> RunningGateway:
        path = tmp_path / "backends.yaml"
        path.write_text(yaml.safe_dump({"backends": backends, "aliases": aliases or {}}))
        values = {"backends_file": str(path), **{k.lower(): v for k, v in settings.items()}}
        gateway = RunningGateway(gateway_settings(**values)).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
