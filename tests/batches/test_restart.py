"""A restart loses nothing: SIGKILL mid-batch and mid-background request, then a new gateway on the same
DATA_DIR (a real SQLite file) finishes them; each custom_id ends exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.gateway import GatewayProcess, chat_body, wait_until
from testkit.upstream import FakeUpstream

from .conftest import chat_line, client, lines_of, submit, wait_status


@pytest.fixture
def gateways(upstream: FakeUpstream, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


def _start(started: list[GatewayProcess], upstream: FakeUpstream, data: Path, **settings: str) -> GatewayProcess:
    gateway = GatewayProcess(
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        DATA_DIR=str(data),
        MAX_CONCURRENT_REQUESTS="2",
        LOG_LEVEL="warning",
        **settings,
    )
    started.append(gateway)
    return gateway.wait_ready()


def test_sigkill_mid_batch_then_restart_ends_each_line_once(
    gateways: list[GatewayProcess], upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.behavior.latency = 0.05
    first = _start(gateways, upstream, tmp_path)
    sdk = client(first.url)
    lines = [chat_line(f"r{n}") for n in range(60)]
    batch = submit(sdk, lines)
    assert wait_until(lambda: (sdk.batches.retrieve(batch.id).request_counts.completed or 0) >= 15, timeout=20)  # type: ignore[union-attr]
    first.kill()  # SIGKILL: no drain, no shutdown
    ran_before = len(upstream.seen)
    assert ran_before < 60

    second = _start(gateways, upstream, tmp_path)
    sdk = client(second.url)
    done = wait_status(sdk, batch.id, timeout=30)
    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.completed == 60
    output = lines_of(sdk, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"r{n}" for n in range(60))  # each once
    assert lines_of(sdk, done.error_file_id) == []
    # The second gateway ran only what had not ended: at most the lines in flight at the kill ran twice.
    assert len(upstream.seen) - 60 <= 8


def test_a_background_request_survives_a_restart(
    gateways: list[GatewayProcess], upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.behavior.latency = 1.0
    first = _start(gateways, upstream, tmp_path)
    accepted = httpx.post(
        first.url + "/v1/chat/completions",
        json=chat_body("later please"),
        headers={"Prefer": "respond-async", "X-Request-ID": "bg-1"},
    )
    assert accepted.status_code == 202
    assert accepted.headers["location"] == "/v1/queue/request/bg-1"
    assert accepted.headers["preference-applied"] == "respond-async"
    assert accepted.json()["id"] == "bg-1" and accepted.json()["status"] in ("queued", "processing")
    pending = httpx.get(first.url + "/v1/queue/request/bg-1/result")
    assert pending.status_code == 202 and pending.json()["id"] == "bg-1"
    first.kill()

    upstream.behavior.latency = 0.0
    second = _start(gateways, upstream, tmp_path)
    url = second.url + "/v1/queue/request/bg-1/result"
    assert wait_until(lambda: httpx.get(url).status_code == 200, timeout=15)
    answer = httpx.get(url).json()
    assert answer["choices"][0]["message"]["content"] == "echo: later please"
    assert httpx.get(second.url + "/v1/queue/request/nope/result").status_code == 404


def test_two_gateways_never_share_one_data_dir(
    gateways: list[GatewayProcess], upstream: FakeUpstream, tmp_path: Path
) -> None:
    _start(gateways, upstream, tmp_path)
    with pytest.raises(RuntimeError, match="in use by another gateway"):
        _start(gateways, upstream, tmp_path)
