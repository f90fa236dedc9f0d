"""The requests the queue knows by id: those alive, and a bounded history of those that have ended.

Ids are the client's own (X-Request-ID), so each key has its own: another key's use of an id is neither refused
nor seen, and never touches this key's record. A request is looked up by (key name, id), the key name None
with authentication off.
"""

from __future__ import annotations

from collections import OrderedDict

from app.queue.job import Job

Name = tuple[str | None, str]  # (key name, request id)


class Registry:
    """Live requests by name, and the last `history_size` that ended (a small record each by then: see
    Job.mark_finished), the least recent forgotten first."""

    __slots__ = ("_history", "_history_size", "_live")

    def __init__(self, history_size: int):
        self._history_size = history_size
        self._live: dict[Name, Job] = {}
        self._history: OrderedDict[Name, Job] = OrderedDict()

    def is_live(self, key_name: str | None, request_id: str) -> bool:
        """Whether a request of this key and id is still running or waiting."""
        return (key_name, request_id) in self._live

    def add(self, job: Job) -> None:
        """An accepted request."""
        self._live[job.key_name, job.id] = job

    def drop(self, job: Job) -> None:
        """A request that turned out never to be accepted: it leaves no record."""
        name = job.key_name, job.id
        if self._live.get(name) is job:
            del self._live[name]

    def ended(self, job: Job) -> None:
        """A request that has ended: it moves to the history (a reused id to its newest end)."""
        name = job.key_name, job.id
        if self._live.get(name) is job:
            del self._live[name]
        if self._history_size:
            self._history.pop(name, None)
            self._history[name] = job
            if len(self._history) > self._history_size:
                self._history.popitem(last=False)

    def lookup(self, request_id: str, key_name: str | None) -> Job | None:
        """A live or remembered request of this key."""
        name = key_name, request_id
        return self._live.get(name) or self._history.get(name)

    def lookup_any(self, request_id: str) -> Job | None:
        """A live or remembered request of any key, the live first, the newest first (for admin keys; it scans)."""
        for jobs in (self._live, self._history):
            for (_, known), job in reversed(jobs.items()):
                if known == request_id:
                    return job
        return None

    def alive(self) -> list[Job]:
        """Every live request."""
        return list(self._live.values())
