"""The bundled model behind one gateway (four slots), shared by a module's tests of what the local backend answers."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from testkit.gateway import RunningGateway, gateway_settings


@pytest.fixture(scope="module")
def local() -> Iterator[RunningGateway]:
    gateway = RunningGateway(gateway_settings(backend="local", n_ctx=1024, max_concurrent_requests=4)).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def local_sdk(local: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0)
