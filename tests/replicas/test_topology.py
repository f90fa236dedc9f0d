"""What the shared queue's scripts read of a replica, on a plain roster: only pools of upstream servers are
shared, with their members' slots and limits and the queue's rules; what a join shares."""

from __future__ import annotations

import json

from app.queue.job import Job
from app.queue.member import Member
from app.queue.roster import Roster
from app.replicas import topology
from app.types import Priority


def test_the_fleet_names_only_the_pools_of_upstream_servers() -> None:
    roster = Roster()
    a = Member("a", 4, models=("m1", "both"), reserved_high=1)
    b = Member("b", 2, models=("both",))
    local = Member("local", 1, kind="local", models=("tiny", "both"))
    roster.replace([a, b, local])
    limits = {"a": (60, 1000), "b": (0, 0)}
    fleet = json.loads(topology.fleet(roster, lambda m: limits[m.name], 2.5, 6.0, 100, 30.0))
    assert fleet["pools"] == {"m1": ["a"]}  # "both" has the local model in it: this replica's own
    assert fleet["members"] == {"a": [4, 1, 60, 1000]}
    assert fleet["aging"] == 2500 and fleet["ttl"] == 6000 and fleet["history_ttl"] == 30000
    assert fleet["levels"] == len(Priority) and fleet["history"] == 100
    assert topology.shareable([a, b]) and not topology.shareable([a, local]) and not topology.shareable([])


def test_a_join_shares_what_waits_for_shared_pools_and_what_runs_at_upstream_servers() -> None:
    roster = Roster()
    proxy, local = Member("p", 1, models=("m",)), Member("l", 1, kind="local", models=("tiny",))
    roster.replace([proxy, local])
    waiting = Job("w", "chat", Priority.LOW, None, 0.0, 0.0, 60.0)
    roster.pools["m"].queue.push(waiting, waiting.rank)
    mine = Job("t", "chat", Priority.LOW, None, 0.0, 0.0, 60.0)
    roster.pools["tiny"].queue.push(mine, mine.rank)
    running, at_local = (Job(n, "chat", Priority.NORMAL, None, 0.0, 0.0, 60.0) for n in ("r", "x"))
    proxy.slots.take(running)
    local.slots.take(at_local)
    assert topology.shared_jobs(roster) == [waiting, running]


def test_the_description_says_how_the_replica_serves() -> None:
    described = json.loads(topology.description("r1", 100.0, 3, 2, "local"))
    assert described["id"] == "r1" and described["started"] == 100.0
    assert (described["waiting"], described["running"], described["mode"]) == (3, 2, "local")
    assert described["heartbeat"] >= described["started"]
