"""A member dies under load: what had not begun streaming is served by the others, cut streams end with their
error event, the member is down after one failed request and rejoins once it answers again."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from testkit.gateway import chat_body, wait_until
from testkit.upstream import FakeUpstream
from tests.fleet.conftest import StartFleet, member


def _backends(url: str) -> dict[str, dict[str, object]]:
    return {b["name"]: b for b in httpx.get(url + "/v1/queue/status").json()["backends"]}


def test_a_member_killed_mid_load_costs_no_request_that_had_not_begun_streaming(
    start_fleet: StartFleet, upstreams: list[FakeUpstream]
) -> None:
    for upstream in upstreams[:3]:
        upstream.behavior.latency = 0.05
        upstream.behavior.pace = 0.05
    victim = upstreams[1]
    gw = start_fleet([member(f"b{i}", u, 2) for i, u in enumerate(upstreams[:3])], upstream_max_retries=2)
    url = gw.url + "/v1/chat/completions"
    statuses: list[int] = []
    streams: list[str] = []  # 'whole' or 'cut' for each stream
    stop = threading.Event()

    def whole_answers() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post(url, json=chat_body("w")).status_code)

    def streamed_answers() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                with client.stream("POST", url, json=chat_body("s", stream=True)) as response:
                    statuses.append(response.status_code)
                    text = "".join(response.iter_text())
                streams.append("cut" if '"error"' in text else "whole")
                assert text.endswith("data: [DONE]\n\n")

    workers = [threading.Thread(target=whole_answers) for _ in range(4)]
    workers += [threading.Thread(target=streamed_answers) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(0.8)
    victim.kill()
    assert wait_until(lambda: not _backends(gw.url)["b1"]["healthy"], timeout=3)
    served_before = len(victim.seen)
    time.sleep(0.8)
    assert len(victim.seen) == served_before  # down: it gets nothing
    victim.start()  # back on its port
    assert wait_until(lambda: _backends(gw.url)["b1"]["healthy"], timeout=5)
    assert wait_until(lambda: len(victim.seen) > served_before, timeout=5)  # and takes work again
    stop.set()
    for worker in workers:
        worker.join(30)
    assert statuses and set(statuses) == {200}
    assert streams.count("whole") > 0
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_backend_retries_total{backend="b1"}' in metrics


def test_every_member_down_answers_503_upstream_unavailable(
    start_fleet: StartFleet, upstreams: list[FakeUpstream]
) -> None:
    gw = start_fleet([member("a", upstreams[0], 1), member("b", upstreams[1], 1)], upstream_max_retries=3)
    upstreams[0].kill()
    upstreams[1].kill()
    url = gw.url + "/v1/chat/completions"
    first = httpx.post(url, json=chat_body("x"))
    assert first.status_code == 502  # it tried both; neither could be reached
    assert wait_until(lambda: not any(b["healthy"] for b in _backends(gw.url).values()))
    refused = httpx.post(url, json=chat_body("y"))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "upstream_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    assert httpx.get(gw.url + "/ready").status_code == 503
    upstreams[0].start()
    assert wait_until(lambda: httpx.post(url, json=chat_body("z")).status_code == 200, timeout=5)
    assert httpx.get(gw.url + "/ready").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_before_the_first_byte_goes_to_another_member_never_the_same_one_twice(
    start_fleet: StartFleet, upstreams: list[FakeUpstream], stream: bool
) -> None:
    broken, good = upstreams[0], upstreams[1]
    broken.behavior.status = 503
    gw = start_fleet([member("broken", broken, 1), member("good", good, 1)], routing="round_robin")
    url = gw.url + "/v1/chat/completions"
    for i in range(4):
        answer = httpx.post(url, json=chat_body(f"r{i}", stream=stream))
        assert answer.status_code == 200
    assert len(good.seen) == 4 and 1 <= len(broken.seen) <= 4  # each attempt on `broken` went on to `good`
