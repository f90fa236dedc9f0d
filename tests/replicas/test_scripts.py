"""The shared queue's Lua scripts on a real Redis, driven directly: order, fairness, aging, leases, quotas."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

from app.replicas.store import Store
from testkit.redis_server import RedisServer

PREFIX = "t"


class Replica:
    """One replica's calls, as app.replicas.coordinator makes them."""

    def __init__(self, server: RedisServer, name: str, fleet: dict[str, Any]):
        self.client = redis.Redis(port=server.port, decode_responses=True)
        self.name = name
        self.store = Store(PREFIX)
        self.shas = {script: self.client.script_load(text) for script, text in self.store.scripts.items()}
        self.fleet = json.dumps(
            {"aging": 0, "levels": 3, "ttl": 10_000, "history": 100, "history_ttl": 60_000, **fleet}
        )
        self.client.set(f"{PREFIX}:rep:{name}", "{}", px=10_000)

    def run(self, script: str, *args: Any) -> Any:
        return self.client.evalsha(self.shas[script], 0, PREFIX, self.fleet, self.name, *args)

    def enqueue(self, request_id: str, rank: int = 1, key: str = "", mode: str = "0", **extra: Any) -> list[Any]:
        return list(
            self.run(
                "enqueue",
                extra.get("pool", "m"),
                rank,
                extra.get("asked", rank),
                key,
                extra.get("cost", 0),
                request_id,
                "",
                extra.get("max_queue_size", 1000),
                extra.get("max_queued", 0),
                mode,
                extra.get("avoid", ""),
                request_id,
            )
        )

    def release(self, ticket: str, key: str = "", request_id: str = "") -> list[Any]:
        return list(self.run("release", ticket, "a", key, request_id, "1", "", 0, -1))


def one_member(slots: int, **member: int) -> dict[str, Any]:
    return {
        "pools": {"m": ["a"]},
        "members": {"a": [slots, member.get("reserved", 0), member.get("rpm", 0), member.get("tpm", 0)]},
    }


def test_a_free_slot_is_granted_at_once_and_the_rest_wait_in_priority_order(redis_server: RedisServer) -> None:
    r = Replica(redis_server, "A", one_member(1))
    first = r.enqueue("run", rank=1)
    assert first[0] == "ok" and first[3:] == [first[1], "a"]  # granted to its own replica at once
    low = r.enqueue("low", rank=2)
    normal = r.enqueue("normal", rank=1)
    high = r.enqueue("high", rank=0)
    assert low[3:] == normal[3:] == high[3:] == []
    order = []
    ticket = first[1]
    for _ in range(3):
        granted = r.release(ticket)
        ticket = granted[1]
        order.append(ticket)
    assert order == [high[1], normal[1], low[1]]


def test_keys_take_turns_within_a_level(redis_server: RedisServer) -> None:
    r = Replica(redis_server, "A", one_member(1))
    ticket = r.enqueue("run")[1]
    tickets = {}
    for name in ("a1", "a2", "a3"):
        tickets[r.enqueue(name, key="team-a")[1]] = name
    tickets[r.enqueue("b1", key="team-b")[1]] = "b1"
    order = []
    for _ in range(4):
        ticket = r.release(ticket)[1]
        order.append(tickets[ticket])
    assert order == ["a1", "b1", "a2", "a3"]


def test_a_high_ticket_on_one_replica_goes_before_lows_of_another_and_grants_reach_their_inbox(
    redis_server: RedisServer,
) -> None:
    a = Replica(redis_server, "A", one_member(1))
    b = Replica(redis_server, "B", one_member(1))
    running = a.enqueue("run")[1]
    for n in range(3):
        a.enqueue(f"low{n}", rank=2)
    high = b.enqueue("high", rank=0)[1]
    assert a.release(running)[1:] == []  # the slot went to B's ticket, not to A's own lows
    assert a.client.lrange(f"{PREFIX}:in:B", 0, -1) == [f"g|{high}|a"]


def test_the_queue_and_a_keys_max_queued_are_bounded_across_replicas(redis_server: RedisServer) -> None:
    a = Replica(redis_server, "A", one_member(1))
    b = Replica(redis_server, "B", one_member(1))
    a.enqueue("run")
    assert a.enqueue("q1", key="k", max_queued=2)[0] == "ok"
    assert b.enqueue("q2", key="k", max_queued=2)[0] == "ok"
    assert b.enqueue("q3", key="k", max_queued=2) == ["key_queue_limit"]
    assert b.enqueue("q4", key="other", max_queue_size=3)[0] == "ok"
    assert a.enqueue("q5", key="other", max_queue_size=3) == ["full"]


def test_a_live_id_on_another_replica_is_a_conflict_for_the_same_key_only(redis_server: RedisServer) -> None:
    a = Replica(redis_server, "A", one_member(1))
    b = Replica(redis_server, "B", one_member(1))
    running = a.enqueue("same", key="k")[1]
    assert b.enqueue("same", key="k") == ["conflict"]
    assert b.enqueue("same", key="other")[0] == "ok"
    a.release(running, key="k", request_id="same")
    assert b.enqueue("same", key="k")[0] == "ok"  # it ended: the id is free again


def test_reserved_slots_go_to_high_only(redis_server: RedisServer) -> None:
    r = Replica(redis_server, "A", one_member(2, reserved=1))
    assert r.enqueue("n1", rank=1)[3:] != []
    assert r.enqueue("n2", rank=1)[3:] == []  # the last slot is kept for high
    assert r.enqueue("h1", rank=0)[3:] != []


def test_aging_raises_a_waiting_ticket_one_level_per_period(redis_server: RedisServer) -> None:
    r = Replica(redis_server, "A", {**one_member(1), "aging": 200})
    running = r.enqueue("run", rank=0)[1]
    old_low = r.enqueue("old-low", rank=2)[1]
    time.sleep(0.45)  # two periods: low -> normal -> high
    new_high = r.enqueue("new-high", rank=0)[1]
    assert r.release(running)[1] == old_low  # high by now, and it came first
    assert r.client.hget(f"{PREFIX}:t:{new_high}", "rank") == "0"


def test_the_leases_of_a_replica_that_died_expire_and_its_tickets_are_dropped(redis_server: RedisServer) -> None:
    fleet = one_member(1)
    a = Replica(redis_server, "A", fleet)
    b = Replica(redis_server, "B", fleet)
    a.fleet = json.dumps({**json.loads(a.fleet), "ttl": 300})
    a.enqueue("run")  # A takes the only slot, with a lease of 300 ms, and dies
    a.enqueue("orphan")
    a.client.delete(f"{PREFIX}:rep:A")
    waiting = b.enqueue("waits")
    assert waiting[3:] == []
    time.sleep(0.35)
    granted = b.run("heartbeat", "{}")
    assert list(granted[2:]) == [waiting[1], "a"]  # A's slot came back; its orphan ticket was dropped
    assert b.client.zcard(f"{PREFIX}:q:m") == 0


def test_a_budget_holds_grants_and_says_when_to_ask_again(redis_server: RedisServer) -> None:
    r = Replica(redis_server, "A", one_member(100, rpm=60))
    for n in range(60):
        assert r.enqueue(f"r{n}")[3:] != []
    held = r.enqueue("over")
    assert held[3:] == [] and 0 < held[2] <= 1000  # one request refills in a second


def test_a_keys_rpm_is_taken_atomically_by_many_clients_at_once(redis_server: RedisServer) -> None:
    replicas = [Replica(redis_server, f"R{n}", one_member(1)) for n in range(3)]
    admitted = []

    def hammer(replica: Replica) -> None:
        for _ in range(40):
            if replica.run("spend", "k", 30, 0, 1, 0, "1")[0] == 0:
                admitted.append(1)

    threads = [threading.Thread(target=hammer, args=(replica,)) for replica in replicas]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refilled = (time.monotonic() - started) * 30 / 60
    assert 30 <= len(admitted) <= 30 + int(refilled) + 1
