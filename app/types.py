"""The product's small shared vocabulary: priorities, request states, completion kinds."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

CompletionKind = Literal["chat", "completion", "embedding"]  # what a request through the queue asks for


class Priority(StrEnum):
    """A request's priority level; the queue serves high before normal before low, and batch lines last.

    BATCH is the gateway's own level for the lines of a batch (app.batches): a client cannot ask for it, it
    never ages up, and it counts neither in MAX_QUEUE_SIZE nor in a key's max_queued.

    `rank` is the one priority-to-rank mapping: the level's index in the queue (0 for high), set once per
    member from the declaration order. `Priority.at(rank)` goes back.
    """

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    BATCH = "batch"

    rank: int

    def __init__(self, value: str) -> None:
        self.rank = len(type(self).__members__)

    @classmethod
    def at(cls, rank: int) -> Priority:
        """The priority whose level is `rank`."""
        return _BY_RANK[rank]


_BY_RANK = tuple(Priority)
INTERACTIVE = (Priority.HIGH, Priority.NORMAL, Priority.LOW)  # what clients may ask for


class JobState(StrEnum):
    """Where a request is in its life; the last four are terminal."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
