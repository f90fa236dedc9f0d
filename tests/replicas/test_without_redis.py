"""A replica whose Redis cannot be reached at all: what each failure mode answers, and bad settings."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from app.settings import SettingsError, load_settings
from testkit.gateway import RunningGateway, chat_body, free_port

StartGateway = Callable[..., RunningGateway]


def test_closed_mode_answers_503_and_is_not_ready(start_gateway: StartGateway) -> None:
    gateway = start_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_failure_mode="closed")
    assert httpx.get(gateway.url + "/ready").status_code == 503
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body())
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "coordination_unavailable"
    assert float(answer.headers["retry-after"]) > 0
    status = httpx.get(gateway.url + "/v1/queue/status").json()
    assert status["coordination"] == "unavailable" and status["replicas"] is None
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "gateway_coordination_up 0.0" in metrics
    assert 'gateway_rejections_total{reason="coordination_unavailable"} 1.0' in metrics


def test_local_mode_serves_alone_with_its_share_of_the_slots(start_gateway: StartGateway) -> None:
    gateway = start_gateway(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_failure_mode="local",
        replicas_expected=2,
        max_concurrent_requests=4,
    )
    assert httpx.get(gateway.url + "/ready").status_code == 200
    assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body()).status_code == 200
    member = next(iter(gateway.scheduler.roster.members.values()))
    assert member.withheld == 2  # half of the four slots: the other replica's share
    status = httpx.get(gateway.url + "/v1/queue/status").json()
    assert status["coordination"] == "local"
    assert "gateway_coordination_local 1.0" in httpx.get(gateway.url + "/metrics").text


def test_redis_url_must_name_redis() -> None:
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings(_env_file=None, redis_url="http://127.0.0.1:6379")
    assert load_settings(_env_file=None, redis_url="rediss://:secret@redis:6380/1").redis_url is not None
