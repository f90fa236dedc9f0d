"""A request with too little time left is answered 408 at once, not dispatched to be cut off at its deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from testkit.gateway import CHAT, Background, RunningGateway
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]


def test_the_upstream_never_sees_a_request_that_could_not_finish(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.behavior.latency = 0.4
    gw = start_gateway(max_concurrent_requests=1, request_timeout=1.0, dispatch_margin=1.0)
    url = gw.url + "/v1/chat/completions"
    assert httpx.post(url, json=CHAT).status_code == 200  # measured: about 0.4 s a request
    background = Background()
    started = time.monotonic()
    first, second = (background.post(url, CHAT) for _ in range(2))
    time.sleep(0.05)
    third = httpx.post(url, json=CHAT, timeout=5)  # dispatchable at ~0.8 s, with ~0.2 s of its 1 s left
    took = time.monotonic() - started
    assert first.result().status_code == 200 and second.result().status_code == 200
    assert third.status_code == 408 and "were left" in third.json()["error"]["message"]
    assert took < 0.97  # answered when its turn came, not at its deadline
    assert len(upstream.seen) == 3  # the first, and the two that could finish
    assert upstream.abandoned == 0
    background.close()
