"""A fleet behind one queue: routing by model, slots per member, priority across a pool, affinity, 429s."""

from __future__ import annotations

import itertools
import time

import httpx
import openai
import pytest

from testkit.gateway import Background, chat_body, wait_until
from testkit.upstream import FakeUpstream
from tests.fleet.conftest import StartFleet, member


@pytest.fixture
def background() -> Background:
    return Background()


def test_no_member_ever_exceeds_its_max_concurrent_and_all_share_the_load(
    start_fleet: StartFleet, upstreams: list[FakeUpstream], background: Background
) -> None:
    limits = (1, 2, 3)
    for upstream in upstreams[:3]:
        upstream.behavior.latency = 0.05
    gw = start_fleet([member(f"b{i}", u, n) for i, (u, n) in enumerate(zip(upstreams, limits, strict=False))])
    url = gw.url + "/v1/chat/completions"
    futures = [background.post(url, chat_body(f"r{i}")) for i in range(60)]
    assert all(f.result().status_code == 200 for f in futures)
    for upstream, limit in zip(upstreams, limits, strict=False):
        assert 1 <= upstream.peak <= limit
        assert upstream.seen  # every member took work
    assert sum(len(u.seen) for u in upstreams[:3]) == 60
    status = httpx.get(gw.url + "/v1/queue/status").json()
    assert status["max_concurrent"] == 6
    assert [(b["name"], b["max_concurrent"], b["healthy"]) for b in status["backends"]] == [
        ("b0", 1, True),
        ("b1", 2, True),
        ("b2", 3, True),
    ]
    assert status["backends"][0]["base_url"] == upstreams[0].base_url
    assert status["pools"] == [
        {
            "model": "m",
            "waiting": 0,
            "waiting_by_priority": {"high": 0, "normal": 0, "low": 0, "batch": 0},
            "members": ["b0", "b1", "b2"],
        }
    ]
    metrics = httpx.get(gw.url + "/metrics").text
    dispatched = {
        b: f'gateway_backend_dispatched_total{{backend="{b}"}} {float(len(u.seen))}'
        for b, u in zip(("b0", "b1", "b2"), upstreams, strict=False)
    }
    assert all(line in metrics for line in dispatched.values())
    assert 'gateway_backend_latency_seconds_count{backend="b2"}' in metrics


def test_priority_is_strict_across_the_members_of_a_pool(
    start_fleet: StartFleet, upstreams: list[FakeUpstream], background: Background
) -> None:
    for upstream in upstreams[:2]:
        upstream.behavior.latency = 1.0
    gw = start_fleet([member("a", upstreams[0], 1), member("b", upstreams[1], 1)])
    url = gw.url + "/v1/chat/completions"
    blockers = [background.post(url, chat_body(f"blocker{i}")) for i in range(2)]
    assert wait_until(lambda: gw.scheduler.in_flight == 2)
    order = [("low-1", "low"), ("low-2", "low"), ("normal-1", "normal"), ("high-1", "high"), ("high-2", "high")]
    futures = []
    for content, priority in order:
        futures.append(background.post(url, chat_body(content), {"X-Priority": priority, "X-Request-ID": content}))
        queued = len(futures)
        assert wait_until(lambda: gw.scheduler.waiting == queued)  # noqa: B023 (called at once, in this turn)
    for upstream in upstreams[:2]:
        upstream.behavior.latency = 0.1
    assert all(f.result().status_code == 200 for f in [*blockers, *futures])
    # On the scheduler's clock: two requests dispatched in one pass share an instant (their wall-clock
    # started_at may then differ either way by the jitter of each one's arrival reading).
    started: dict[str, float] = {}
    for content, _ in order:
        job = gw.scheduler.registry.lookup(content, None)
        assert job is not None and job.started is not None
        started[content] = job.started
    by_level = [["high-1", "high-2"], ["normal-1"], ["low-1", "low-2"]]
    for higher, lower in itertools.pairwise(by_level):
        assert max(started[c] for c in higher) <= min(started[c] for c in lower)
    assert started["high-1"] <= started["high-2"] and started["low-1"] <= started["low-2"]  # in order of arrival


def test_models_are_routed_apart_and_a_busy_one_does_not_delay_the_other(
    start_fleet: StartFleet, upstreams: list[FakeUpstream], background: Background
) -> None:
    slow, fast = upstreams[0], upstreams[1]
    slow.behavior.latency = 1.5
    gw = start_fleet(
        [
            member("slow", slow, 1, models=["big"]),
            member("fast", fast, 1, models=["small", "tiny"]),
        ],
        aliases={"gpt-4o-mini": "small"},
    )
    url = gw.url + "/v1/chat/completions"
    busy = [background.post(url, chat_body(f"big{i}", model="big")) for i in range(3)]
    assert wait_until(lambda: gw.scheduler.waiting == 2)
    started = time.monotonic()
    answer = httpx.post(url, json=chat_body("quick", model="gpt-4o-mini"), timeout=10)
    assert answer.status_code == 200 and time.monotonic() - started < 1.0
    assert fast.seen[-1].body["model"] == "small"  # the alias is resolved before the body goes upstream
    status = httpx.get(gw.url + "/v1/queue/status").json()
    pools = {p["model"]: p for p in status["pools"]}
    assert pools["big"]["waiting"] == 2 and pools["small"]["waiting"] == 0 and pools["big"]["members"] == ["slow"]
    assert all(f.result().status_code == 200 for f in busy)
    assert not [s for s in slow.seen if s.body["model"] != "big"]

    missing = httpx.post(url, json=chat_body("x", model="nope"))
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "big" not in error["message"] and "small" not in error["message"]  # nothing of what others use

    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    listed = {m.id: m.owned_by for m in client.models.list()}
    assert listed == {"big": "proxy", "small": "proxy", "tiny": "proxy", "gpt-4o-mini": "proxy"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    record = httpx.get(gw.url + f"/v1/queue/request/{answer.headers['x-request-id']}").json()
    assert record["model"] == "small" and record["backend"] == "fast"


def test_models_a_proxy_does_not_list_are_discovered_from_it(
    start_fleet: StartFleet, upstreams: list[FakeUpstream]
) -> None:
    upstreams[0].models = ("llama-3-8b", "qwen-7b")
    gw = start_fleet([{"name": "vllm", "type": "proxy", "base_url": upstreams[0].base_url}])
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body("x", model="qwen-7b")).status_code == 200
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body("x", model="m")).status_code == 404
    ids = [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]]
    assert ids == ["llama-3-8b", "qwen-7b"]


def test_a_429_on_one_member_pauses_only_that_member(start_fleet: StartFleet, upstreams: list[FakeUpstream]) -> None:
    limited, other = upstreams[0], upstreams[1]
    limited.behavior.status = 429
    limited.behavior.retry_after = "30"
    gw = start_fleet([member("limited", limited, 4), member("other", other, 4)], routing="round_robin")
    url = gw.url + "/v1/chat/completions"
    answers = [httpx.post(url, json=chat_body(f"r{i}")) for i in range(8)]
    assert [a.status_code for a in answers] == [200] * 8  # the refused one went on to the other member
    assert len(limited.seen) == 1 and len(other.seen) == 8
    backends = {b["name"]: b for b in httpx.get(gw.url + "/v1/queue/status").json()["backends"]}
    assert backends["limited"]["rate_limits"]["paused_seconds"] > 20
    assert backends["other"]["rate_limits"]["paused_seconds"] == 0
    assert backends["limited"]["healthy"] and backends["other"]["healthy"]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_backend_retries_total{backend="limited"} 1.0' in metrics


def test_affinity_sends_a_conversation_back_to_its_member_while_it_has_room(
    start_fleet: StartFleet, upstreams: list[FakeUpstream]
) -> None:
    gw = start_fleet([member(f"b{i}", u, 2) for i, u in enumerate(upstreams[:3])])
    url = gw.url + "/v1/chat/completions"
    hits = []
    for turn in range(4):
        for conversation in range(6):
            messages = [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"conversation {conversation} opens"},
            ]
            for earlier in range(turn):
                messages += [
                    {"role": "assistant", "content": f"answer {earlier}"},
                    {"role": "user", "content": "go on"},
                ]
            answer = httpx.post(url, json={"model": "m", "messages": messages})
            assert answer.status_code == 200
            if turn:
                hits.append(answer.json()["prefix_cache"] == "hit")
    assert all(hits)
    assert sum(bool(u.seen) for u in upstreams[:3]) >= 2  # conversations were spread, then kept

    # The X-Session-ID header names a conversation whatever its messages say.
    first = httpx.post(url, json=chat_body("a"), headers={"X-Session-ID": "s-1"})
    record = httpx.get(gw.url + f"/v1/queue/request/{first.headers['x-request-id']}").json()
    for text in ("b", "c", "d"):
        again = httpx.post(url, json=chat_body(text), headers={"X-Session-ID": "s-1"})
        other = httpx.get(gw.url + f"/v1/queue/request/{again.headers['x-request-id']}").json()
        assert other["backend"] == record["backend"]


def test_affinity_never_makes_a_request_wait_while_another_member_is_free(
    start_fleet: StartFleet, upstreams: list[FakeUpstream], background: Background
) -> None:
    upstreams[0].behavior.latency = upstreams[1].behavior.latency = 0.5
    gw = start_fleet([member("a", upstreams[0], 1), member("b", upstreams[1], 1)])
    url = gw.url + "/v1/chat/completions"
    assert httpx.post(url, json=chat_body("x", user="alice")).status_code == 200
    home = next(u for u in upstreams[:2] if u.seen)
    started = time.monotonic()
    futures = [background.post(url, chat_body(f"x{i}", user="alice")) for i in range(2)]
    assert all(f.result().status_code == 200 for f in futures)
    assert time.monotonic() - started < 0.9  # both ran at once: one on alice's member, one on the other
    assert len(home.seen) == 2


def test_a_proxy_down_at_start_joins_once_it_lists_its_models(
    start_fleet: StartFleet, upstreams: list[FakeUpstream]
) -> None:
    late = upstreams[0]
    late.kill()
    gw = start_fleet([{"name": "late", "type": "proxy", "base_url": late.base_url, "probe_interval": 0.1}])
    url = gw.url + "/v1/chat/completions"
    assert httpx.post(url, json=chat_body("x", model="fake-model")).status_code == 404  # nothing known yet
    assert httpx.get(gw.url + "/v1/models").json()["data"] == []
    assert httpx.get(gw.url + "/ready").status_code == 503
    late.start()
    assert wait_until(lambda: httpx.post(url, json=chat_body("x", model="fake-model")).status_code == 200, timeout=5)
    assert httpx.get(gw.url + "/ready").status_code == 200
