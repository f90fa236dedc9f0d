"""API keys: 401 without one, constant-time checks, each key sees only its own requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from testkit.gateway import Background, RunningGateway, chat_body, wait_until
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]
ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


def test_v1_routes_need_a_key_ops_routes_do_not(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(api_keys="alice-key, bob-key", upstream_api_key="upstream-secret")
    for method, path in [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/queue/status"),
        ("GET", "/v1/queue/request/x"),
        ("DELETE", "/v1/queue/request/x"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic alice-key"}):
            response = httpx.request(method, gw.url + path, json=chat_body(), headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
    for path in ("/health", "/metrics"):
        assert httpx.get(gw.url + path).status_code == 200
    assert upstream.seen == []

    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=ALICE)
    assert response.status_code == 200
    sent = upstream.seen[-1].headers
    assert sent["Authorization"] == "Bearer upstream-secret"  # ours goes upstream, the client's never does
    assert "alice-key" not in str(sent)


def test_openai_sdk_with_a_key(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(api_keys="alice-key")
    good = openai.OpenAI(base_url=gw.url + "/v1", api_key="alice-key")
    assert good.completions.create(model="m", prompt="hi").choices[0].text == "echo: hi"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="nope").completions.create(model="m", prompt="hi")


def test_a_key_sees_and_cancels_only_its_own_requests(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(api_keys="alice-key,bob-key", max_concurrent_requests=1)
    upstream.behavior.hang = True
    background = Background()
    running = background.post(gw.url + "/v1/chat/completions", chat_body(), {**ALICE, "X-Request-ID": "alices"})
    assert wait_until(lambda: upstream.active == 1)
    url = gw.url + "/v1/queue/request/alices"
    assert httpx.get(url, headers=BOB).status_code == 404
    assert httpx.delete(url, headers=BOB).status_code == 404
    assert httpx.get(url, headers=ALICE).json()["status"] == "processing"
    assert httpx.delete(url, headers=ALICE).json()["status"] == "cancelled"
    assert running.result().status_code == 499
    background.close()


def test_request_ids_belong_to_their_key_and_status_shows_others_only_as_counts(
    start_gateway: StartGateway, upstream: FakeUpstream, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: carol-key, name: carol, admin: true}\n")
    gw = start_gateway(api_keys="alice-key,bob-key", api_keys_file=str(keys), max_concurrent_requests=2)
    carol = {"Authorization": "Bearer carol-key"}
    upstream.behavior.hang = True
    background = Background()
    alices = background.post(gw.url + "/v1/chat/completions", chat_body(), {**ALICE, "X-Request-ID": "shared-id"})
    assert wait_until(lambda: upstream.active == 1)
    # Bob reusing Alice's live id is simply a request of his own: no 409 that would confirm hers exists.
    bobs = background.post(gw.url + "/v1/chat/completions", chat_body(), {**BOB, "X-Request-ID": "shared-id"})
    assert wait_until(lambda: upstream.active == 2)
    status = httpx.get(gw.url + "/v1/queue/status", headers=BOB).json()
    assert sorted(w["current_request_id"] or "-" for w in status["workers"]) == ["-", "shared-id"]
    assert status["processing_count"] == 2  # Alice's request counts, unnamed
    seen_by_admin = httpx.get(gw.url + "/v1/queue/status", headers=carol).json()
    assert [w["current_request_id"] for w in seen_by_admin["workers"]] == ["shared-id", "shared-id"]
    url = gw.url + "/v1/queue/request/shared-id"
    assert httpx.delete(url, headers=BOB).json()["status"] == "cancelled"  # his own
    assert bobs.result().status_code == 499
    assert httpx.get(url, headers=ALICE).json()["status"] == "processing"  # hers is untouched
    assert httpx.delete(url, headers=carol).json()["status"] == "cancelled"  # an admin may cancel anyone's
    assert alices.result().status_code == 499
    # Bob's finished record does not replace Alice's: each key finds its own.
    assert httpx.get(url, headers=ALICE).json()["status"] == "cancelled"
    assert httpx.get(url, headers=BOB).json()["status"] == "cancelled"
    background.close()
