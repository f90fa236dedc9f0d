"""Replicas share one real redis-server, started on a free loopback port for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if not RedisServer.available():
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server; make test installs it)")
    server = RedisServer().start()
    yield server
    server.stop()
