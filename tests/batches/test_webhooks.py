"""Webhooks: Standard Webhooks signatures checked with the `standardwebhooks` package, retries while the
receiver is down, and where the URL comes from (the keys file or the settings, never a request)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from testkit.gateway import RunningGateway, chat_body, wait_until
from testkit.webhooks import WebhookReceiver

from .conftest import chat_line, client, submit, wait_status

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


def test_batch_events_are_signed_and_retried_until_they_land(
    start_gateway: Callable[..., RunningGateway], receiver: WebhookReceiver, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"key": "sk-hooked", "name": "hooked", "webhook_url": receiver.url, "webhook_secret": SECRET},
                    {"key": "sk-plain", "name": "plain"},
                ]
            }
        )
    )
    gateway = start_gateway(API_KEYS_FILE=str(keys), WEBHOOK_RETRY_SECONDS=0.2)
    receiver.down = True
    sdk = client(gateway.url, "sk-hooked")
    done = wait_status(sdk, submit(sdk, [chat_line("a"), chat_line("b")]).id)
    assert wait_until(lambda: len(receiver.deliveries) >= 3, timeout=10)  # the first try and two retries
    status = httpx.get(gateway.url + "/v1/queue/status", headers={"Authorization": "Bearer sk-hooked"}).json()
    assert status["webhooks"]["pending"] == 1
    receiver.down = False
    assert wait_until(lambda: receiver.accepted, timeout=10)
    delivery = receiver.accepted[0]
    event = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert event["type"] == "batch.completed" and event["data"] == {"id": done.id}
    assert {d.headers["webhook-id"] for d in receiver.deliveries} == {event["id"]}  # retries keep the id
    forged = {**delivery.headers, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(delivery.body, forged)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
    assert 'gateway_webhook_deliveries_total{outcome="retried"}' in metrics
    assert "gateway_webhook_deliveries_pending 0.0" in metrics
    # A key without a webhook sends none.
    plain = client(gateway.url, "sk-plain")
    wait_status(plain, submit(plain, [chat_line("c")]).id)
    time.sleep(0.5)
    assert len(receiver.accepted) == 1


def test_a_failed_batch_and_a_background_request_send_theirs(
    start_gateway: Callable[..., RunningGateway], receiver: WebhookReceiver
) -> None:
    gateway = start_gateway(WEBHOOK_URL=receiver.url, WEBHOOK_SECRET=SECRET)
    sdk = client(gateway.url)
    failed = wait_status(sdk, submit(sdk, [chat_line("a"), chat_line("a")]).id)
    assert failed.status == "failed"
    accepted = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    assert wait_until(lambda: len(receiver.accepted) == 2, timeout=10)
    events = {}
    for delivery in receiver.accepted:
        event = Webhook(SECRET).verify(delivery.body, delivery.headers)
        events[event["type"]] = event["data"]
    assert events["batch.failed"] == {"id": failed.id}
    assert events["request.completed"] == {"id": accepted.json()["id"], "status_code": 200}
    assert orjson.loads(receiver.accepted[0].body)["object"] == "event"
