"""A priority queue for a few fixed levels: FIFO within a level, O(1) push, pop and removal."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Generic, Protocol, TypeVar

# Removed items stay in their level until popped; a level is rebuilt once they outnumber its live items.
_COMPACT_MIN_DEAD = 64


class Queueable(Protocol):
    """What the queue writes on an item: where it waits, and which push put it there."""

    queue_owner: object | None
    queue_seq: int


T = TypeVar("T", bound=Queueable)


class PriorityQueue(Generic[T]):
    """Level 0 first; within a level, arrival order.

    One deque per level: with three priorities, finding the first non-empty level is cheaper than any heap,
    and the cost per operation does not grow with the number waiting.

    >>> q = PriorityQueue(levels=3)
    >>> q.push(job_a, rank=2); q.push(job_b, rank=0)  # doctest: +SKIP
    >>> q.pop() is job_b  # doctest: +SKIP
    True
    """

    __slots__ = ("_counts", "_dead", "_levels", "_seq", "_size")

    def __init__(self, levels: int):
        self._levels: list[deque[tuple[int, T]]] = [deque() for _ in range(levels)]
        self._counts = [0] * levels
        self._dead = [0] * levels
        self._size = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._size

    def count(self, rank: int) -> int:
        """How many live items wait at this level."""
        return self._counts[rank]

    def push(self, item: T, rank: int) -> None:
        """Queue `item` behind everything at its level and above."""
        seq = next(self._seq)
        item.queue_owner = self
        item.queue_seq = seq
        self._levels[rank].append((seq, item))
        self._counts[rank] += 1
        self._size += 1

    def pop(self) -> T | None:
        """The first live item, or None when empty."""
        if not self._size:
            return None
        for rank, level in enumerate(self._levels):
            while level:
                seq, item = level.popleft()
                if item.queue_owner is self and item.queue_seq == seq:
                    item.queue_owner = None
                    self._counts[rank] -= 1
                    self._size -= 1
                    return item
                self._dead[rank] -= 1
        return None

    def remove(self, item: T, rank: int) -> bool:
        """Take `item` out wherever it stands; False if it is not waiting here."""
        if item.queue_owner is not self:
            return False
        item.queue_owner = None
        self._counts[rank] -= 1
        self._size -= 1
        self._dead[rank] += 1
        level = self._levels[rank]
        if self._dead[rank] > _COMPACT_MIN_DEAD and self._dead[rank] * 2 > len(level):
            self._levels[rank] = deque(e for e in level if e[1].queue_owner is self and e[1].queue_seq == e[0])
            self._dead[rank] = 0
        return True

    def position(self, item: T, rank: int) -> int | None:
        """1-based place of a waiting item (O(n): for status look-ups, never on the dispatch path)."""
        if item.queue_owner is not self:
            return None
        ahead = sum(self._counts[:rank])
        for seq, other in self._levels[rank]:
            if other is item:
                return ahead + 1
            if other.queue_owner is self and other.queue_seq == seq:
                ahead += 1
        return None

    def items(self) -> list[T]:
        """Every live item, in queue order."""
        return [
            item for level in self._levels for seq, item in level if item.queue_owner is self and item.queue_seq == seq
        ]
