"""The registry of requests by id, on plain jobs: per-key names, the bounded history, lookups."""

from __future__ import annotations

from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.registry import Registry
from app.types import JobState, Priority


def job(request_id: str, key: str | None = None) -> Job:
    account = None if key is None else KeyAccount.unlimited(key)
    return Job(request_id, "chat", Priority.NORMAL, account, 0.0, 0.0, 60.0)


def test_ids_belong_to_their_key_and_the_history_keeps_the_newest() -> None:
    registry = Registry(history_size=2)
    mine, theirs = job("same", "a"), job("same", "b")
    registry.add(mine)
    registry.add(theirs)
    assert registry.is_live("a", "same") and registry.is_live("b", "same") and not registry.is_live(None, "same")
    assert registry.lookup("same", "a") is mine and registry.lookup("same", "b") is theirs
    for ended in (mine, theirs):
        ended.mark_finished(JobState.COMPLETED, 1.0)
        registry.ended(ended)
    assert not registry.is_live("a", "same") and registry.lookup("same", "a") is mine  # remembered
    again = job("same", "a")  # a reused id: the newest record, and live again
    registry.add(again)
    assert registry.lookup("same", "a") is again and registry.lookup_any("same") is again
    again.mark_finished(JobState.COMPLETED, 2.0)
    registry.ended(again)
    third = job("other")
    registry.add(third)
    registry.ended(third)
    assert registry.lookup("same", "b") is None  # the least recent of three, past history_size
    assert registry.lookup("same", "a") is again and registry.lookup("other", None) is third
    assert registry.alive() == []


def test_a_dropped_request_leaves_no_record_and_no_history_keeps_none() -> None:
    registry = Registry(history_size=0)
    refused, kept = job("r"), job("k")
    registry.add(refused)
    registry.add(kept)
    registry.drop(refused)
    assert registry.lookup("r", None) is None and registry.alive() == [kept]
    registry.ended(kept)
    assert registry.lookup("k", None) is None
