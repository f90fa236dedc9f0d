"""A priority queue for a few fixed levels, fair across owners within a level; O(1) push, pop and removal."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from typing import Generic, Protocol, TypeVar

# Removed items stay in their deque until popped; a level is rebuilt once they outnumber its live items.
_COMPACT_MIN_DEAD = 64


class Queueable(Protocol):
    """What the queue writes on an item: where it waits, which push put it there, and whose turn it takes."""

    queue_owner: object | None
    queue_seq: int
    queue_key: object


T = TypeVar("T", bound=Queueable)


class _Level(Generic[T]):
    """One priority level: a deque per key, the keys in a ring whose head has the next turn."""

    __slots__ = ("count", "dead", "ring")

    def __init__(self) -> None:
        self.ring: OrderedDict[object, deque[tuple[int, T]]] = OrderedDict()
        self.count = 0
        self.dead = 0


class PriorityQueue(Generic[T]):
    """Level 0 first; within a level, keys take turns (round robin), and each key's items keep arrival order.

    A key that sends a thousand requests at once waits behind itself, not in front of everyone else: a key
    with one request waits for at most one request of each other key at its level. With a single key
    (authentication off) this is plain FIFO within a level.

    One deque per key per level: with three priorities, finding the first non-empty level is cheaper than any
    heap, and the cost per operation does not grow with the number waiting.

    >>> q = PriorityQueue(levels=3)
    >>> q.push(job_a, rank=2, key="team-a"); q.push(job_b, rank=0, key="team-b")  # doctest: +SKIP
    >>> q.pop() is job_b  # doctest: +SKIP
    True
    """

    __slots__ = ("_levels", "_seq", "_size")

    def __init__(self, levels: int):
        self._levels: list[_Level[T]] = [_Level() for _ in range(levels)]
        self._size = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._size

    def count(self, rank: int) -> int:
        """How many live items wait at this level."""
        return self._levels[rank].count

    def push(self, item: T, rank: int, key: object = None) -> None:
        """Queue `item` behind everything of its key at its level; a new key takes the last turn."""
        seq = next(self._seq)
        item.queue_owner = self
        item.queue_seq = seq
        item.queue_key = key
        level = self._levels[rank]
        entries = level.ring.get(key)
        if entries is None:
            entries = level.ring[key] = deque()
        entries.append((seq, item))
        level.count += 1
        self._size += 1

    def _head(self, level: _Level[T]) -> tuple[object, deque[tuple[int, T]]] | None:
        """The key whose turn it is and its deque, its head live; dead heads and emptied keys are dropped."""
        ring = level.ring
        while ring:
            key, entries = next(iter(ring.items()))
            while entries:
                seq, item = entries[0]
                if item.queue_owner is self and item.queue_seq == seq:
                    return key, entries
                entries.popleft()
                level.dead -= 1
            del ring[key]
        return None

    def peek(self) -> T | None:
        """The item pop() would return, left in place."""
        if not self._size:
            return None
        for level in self._levels:
            if level.count:
                head = self._head(level)
                if head is not None:
                    return head[1][0][1]
        return None

    def pop(self) -> T | None:
        """The first live item, or None when empty; its key goes to the back of the ring."""
        if not self._size:
            return None
        for level in self._levels:
            if not level.count:
                continue
            ring = level.ring
            while ring:
                # The ring's head, the key whose turn it is (a for-break is the cheapest way to read it).
                for key, entries in ring.items():  # noqa: B007
                    break
                while entries:
                    seq, item = entries.popleft()
                    if item.queue_owner is self and item.queue_seq == seq:
                        if len(ring) > 1:  # to the back of the ring, or out of it once it has nothing left
                            if entries:
                                ring.move_to_end(key)
                            else:
                                del ring[key]
                        # A lone key keeps its deque even when empty: the next push needs no new one.
                        item.queue_owner = None
                        level.count -= 1
                        self._size -= 1
                        return item
                    level.dead -= 1
                del ring[key]
        return None

    def remove(self, item: T, rank: int) -> bool:
        """Take `item` out wherever it stands; False if it is not waiting here."""
        if item.queue_owner is not self:
            return False
        item.queue_owner = None
        level = self._levels[rank]
        level.count -= 1
        self._size -= 1
        level.dead += 1
        if level.dead > _COMPACT_MIN_DEAD and level.dead > level.count:
            self._compact(level)
        return True

    def _compact(self, level: _Level[T]) -> None:
        ring: OrderedDict[object, deque[tuple[int, T]]] = OrderedDict()
        for key, entries in level.ring.items():
            live = deque(e for e in entries if e[1].queue_owner is self and e[1].queue_seq == e[0])
            if live:
                ring[key] = live
        level.ring = ring
        level.dead = 0

    def _live(self, entries: deque[tuple[int, T]]) -> list[T]:
        return [item for seq, item in entries if item.queue_owner is self and item.queue_seq == seq]

    def position(self, item: T, rank: int) -> int | None:
        """1-based place of a waiting item, turns included (O(n): for status look-ups, never on dispatch)."""
        if item.queue_owner is not self:
            return None
        level = self._levels[rank]
        own = level.ring.get(item.queue_key)
        if own is None:
            return None
        mine = self._live(own)
        turn = mine.index(item)  # items of its own key ahead of it
        ahead = sum(self._levels[r].count for r in range(rank)) + turn
        before_key = True
        for key, entries in level.ring.items():
            if key == item.queue_key:
                before_key = False
                continue
            # Each round gives every key one turn: keys before ours in the ring go first in each round.
            ahead += min(len(self._live(entries)), turn + 1 if before_key else turn)
        return ahead + 1

    def items(self) -> list[T]:
        """Every live item, level by level."""
        return [item for level in self._levels for entries in level.ring.values() for item in self._live(entries)]
