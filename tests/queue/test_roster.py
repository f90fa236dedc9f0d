"""The roster on plain members: pools by model, a reload's replacement, retiring members, aliases."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequest, ModelNotFound
from app.queue.job import Job
from app.queue.member import Member
from app.queue.roster import ANY_MODEL, Roster
from app.types import Priority


def test_pools_follow_the_members_models_and_keep_their_queues_across_a_reload() -> None:
    roster = Roster()
    a, b = Member("a", 2, models=("m1", "m2")), Member("b", 1, models=("m2",))
    assert roster.replace([a, b], {"public": "m1"}) == []
    assert set(roster.pools) == {"m1", "m2"} and roster.pools["m2"].members == [a, b]
    assert roster.member_pools[a] == (roster.pools["m1"], roster.pools["m2"])
    assert roster.pool_for("public") is roster.pools["m1"] and roster.pool_for("m2") is roster.pools["m2"]
    with pytest.raises(ModelNotFound):
        roster.pool_for("m3")
    with pytest.raises(InvalidRequest):
        roster.pool_for(None)  # several models: the request must name one
    waiting = Job("w", "chat", Priority.NORMAL, None, 0.0, 0.0, 60.0)
    m2 = roster.pools["m2"]
    m2.queue.push(waiting, waiting.rank)
    closed = roster.replace([b])  # a leaves; m1 is served by no one now
    assert [pool.model for pool in closed] == ["m1"]
    assert roster.pools["m2"] is m2 and m2.members == [b] and m2.queue.peek() is waiting  # the queue stays
    assert roster.pool_for(None) is m2  # one model left: a request may leave it out
    assert roster.retiring == [] and a.retiring  # nothing ran at a: closed at once


def test_a_removed_member_retires_once_its_last_request_ends() -> None:
    roster = Roster()
    old = Member("old", 1)
    roster.replace([old])
    assert roster.pool_for("anything") is roster.pools[ANY_MODEL]  # a fleet of one that names no models
    running = Job("r", "chat", Priority.NORMAL, None, 0.0, 0.0, 60.0)
    slot = running.slot = old.slots.take(running)  # as the scheduler takes it
    retired: list[str] = []
    roster.on_retired = lambda member: retired.append(member.name)
    new = Member("old", 1)  # a reload: same name, a new member
    roster.replace([new])
    assert roster.members == {"old": new} and roster.retiring == [old] and retired == []
    assert roster.in_flight == 1 and roster.processing == 1 and roster.backends_in_flight() == {"old": 1}
    assert roster.max_concurrent == 1 and roster.slots == new.slots.slots  # the retiring member's are not offered
    old.slots.give(slot, True)
    roster.check_retired(old)
    assert retired == ["old"] and roster.retiring == [] and roster.in_flight == 0
    roster.check_retired(new)  # not retiring: nothing happens
    assert retired == ["old"]
