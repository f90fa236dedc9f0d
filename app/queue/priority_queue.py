"""A priority queue for a few fixed levels, fair across keys within a level; O(1) push, pop and removal."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

# Removed items stay in their deque until popped; a level is rebuilt once they outnumber its live items.
_COMPACT_MIN_DEAD = 64


class Queueable(Protocol):
    """What the queue writes on an item: the queue and level it waits at, and whose turn it takes."""

    waiting_in: object | None
    waiting_level: object | None
    turn_key: object


T = TypeVar("T", bound=Queueable)


class _Level(Generic[T]):
    """One priority level: a deque per key, and the keys in turn order (the first has the next turn)."""

    __slots__ = ("count", "dead", "queues", "turns")

    def __init__(self) -> None:
        self.queues: dict[object, deque[T]] = {}
        self.turns: deque[object] = deque()  # the keys of `queues`, each once
        self.count = 0
        self.dead = 0


class PriorityQueue(Generic[T]):
    """Level 0 first; within a level, keys take turns (round robin), and each key's items keep arrival order.

    A key that sends a thousand requests at once waits behind itself, not in front of everyone else: a key
    with one request waits for at most one request of each other key at its level. With a single key
    (authentication off) this is plain FIFO within a level.

    One deque per key per level: with three priorities, finding the first non-empty level is cheaper than any
    heap, and the cost per operation does not grow with the number waiting. `size` is the number waiting
    (also len()), a plain attribute because the scheduler reads it on every dispatch.

    The deques hold the items themselves (no wrapper: a popped item is the only object its pop touches);
    an entry is live while its item says it waits in this queue at this level. An item removed and later
    pushed at the same level again would find its dead entry still there, so that push compacts the level
    first (the scheduler never does it: its requests only move up).

    >>> q = PriorityQueue(levels=3)
    >>> q.push(job_a, rank=2, key="team-a"); q.push(job_b, rank=0, key="team-b")  # doctest: +SKIP
    >>> q.pop() is job_b  # doctest: +SKIP
    True
    """

    __slots__ = ("_levels", "size")

    def __init__(self, levels: int):
        self._levels: list[_Level[T]] = [_Level() for _ in range(levels)]
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def count(self, rank: int) -> int:
        """How many live items wait at this level."""
        return self._levels[rank].count

    def push(self, item: T, rank: int, key: object = None) -> None:
        """Queue `item` behind everything of its key at its level; a new key takes the last turn."""
        level, entries = self._place(item, rank, key)
        if entries is None:
            entries = level.queues[key] = deque()
            level.turns.append(key)
        entries.append(item)

    def push_first(self, item: T, rank: int, key: object = None) -> None:
        """Queue `item` ahead of everything at its level, its key's turn next (a request that comes back
        after its backend failed it, before its client saw a byte: it was first already)."""
        level, entries = self._place(item, rank, key)
        if entries is None:
            entries = level.queues[key] = deque()
        else:
            level.turns.remove(key)
        level.turns.appendleft(key)
        entries.appendleft(item)

    def _place(self, item: T, rank: int, key: object) -> tuple[_Level[T], deque[T] | None]:
        """Mark `item` as waiting at `rank` and count it; its level, and its key's deque there if it has one."""
        level = self._levels[rank]
        if item.waiting_level is level:  # removed from this very level before: its dead entry goes first
            self._compact(level)
        item.waiting_in = self
        item.waiting_level = level
        item.turn_key = key
        level.count += 1
        self.size += 1
        return level, level.queues.get(key)

    def _head(self, level: _Level[T]) -> deque[T] | None:
        """The deque of the key whose turn it is, its head live; dead heads and emptied keys are dropped."""
        turns, queues = level.turns, level.queues
        while turns:
            entries = queues[turns[0]]
            while entries:
                item = entries[0]
                if item.waiting_in is self and item.waiting_level is level:
                    return entries
                entries.popleft()
                level.dead -= 1
            del queues[turns.popleft()]
        return None

    def peek(self) -> T | None:
        """The item pop() would return, left in place."""
        if not self.size:
            return None
        for level in self._levels:
            if level.count:
                entries = self._head(level)
                if entries is not None:
                    return entries[0]
        return None

    def pop(self) -> T | None:
        """The first live item, or None when empty; its key goes to the back of the turns."""
        if not self.size:
            return None
        for level in self._levels:
            if not level.count:
                continue
            entries = self._head(level)
            if entries is None:
                continue
            item = entries.popleft()
            turns = level.turns
            if len(turns) > 1:  # to the back of the turns, or out of them once it has nothing left
                if entries:
                    turns.rotate(-1)
                else:
                    del level.queues[turns.popleft()]
            # A lone key keeps its deque even when empty: the next push needs no new one.
            item.waiting_in = item.waiting_level = None
            level.count -= 1
            self.size -= 1
            return item
        return None

    def remove(self, item: T, rank: int) -> bool:
        """Take `item` out wherever it stands; False if it is not waiting here."""
        if item.waiting_in is not self:
            return False
        item.waiting_in = None  # waiting_level stays: its entry is still in that level's deque
        level = self._levels[rank]
        level.count -= 1
        self.size -= 1
        level.dead += 1
        if level.dead > _COMPACT_MIN_DEAD and level.dead > level.count:
            self._compact(level)
        return True

    def _compact(self, level: _Level[T]) -> None:
        queues: dict[object, deque[T]] = {}
        for key in level.turns:
            live = deque(self._live(level, level.queues[key]))
            if live:
                queues[key] = live
        level.queues = queues
        level.turns = deque(queues)
        level.dead = 0

    def _live(self, level: _Level[T], entries: deque[T]) -> list[T]:
        return [item for item in entries if item.waiting_in is self and item.waiting_level is level]

    def position(self, item: T, rank: int) -> int | None:
        """1-based place of a waiting item, turns included (O(n): for status look-ups, never on dispatch)."""
        if item.waiting_in is not self:
            return None
        level = self._levels[rank]
        own = level.queues.get(item.turn_key)
        if own is None:
            return None
        mine = self._live(level, own)
        turn = mine.index(item)  # items of its own key ahead of it
        ahead = sum(self._levels[r].count for r in range(rank)) + turn
        before_key = True
        for key in level.turns:
            if key == item.turn_key:
                before_key = False
                continue
            # Each round gives every key one turn: keys before ours in the turns go first in each round.
            ahead += min(len(self._live(level, level.queues[key])), turn + 1 if before_key else turn)
        return ahead + 1

    def ahead_of_new(self, rank: int, key: object = None) -> int:
        """How many would go before an item pushed now at `rank` for `key` (O(keys at that level): on arrival).

        Exact with one key per level; with several, removed items not yet compacted count as waiting.
        """
        ahead = sum(self._levels[r].count for r in range(rank))
        level = self._levels[rank]
        turns = level.turns
        if not turns or (len(turns) == 1 and turns[0] == key):
            return ahead + level.count
        own = level.queues.get(key)
        turn = min(len(own), level.count) if own is not None else 0
        before_key = True
        for other in turns:
            if other == key:
                before_key = False
                continue
            ahead += min(len(level.queues[other]), turn + 1 if before_key or own is None else turn)
        return min(ahead, sum(self._levels[r].count for r in range(rank + 1)))

    def ordered(self, rank: int) -> Iterator[T]:
        """The live items of one level in the order they will be popped (the keys' turns interleaved), lazily:
        taking the first few costs about as many steps."""
        level = self._levels[rank]
        streams = [(item for item in level.queues[key] if self._is_live(level, item)) for key in level.turns]
        while streams:
            still = []
            for stream in streams:
                item = next(stream, None)
                if item is not None:
                    still.append(stream)
                    yield item
            streams = still

    def _is_live(self, level: _Level[T], item: T) -> bool:
        return item.waiting_in is self and item.waiting_level is level

    def items(self) -> list[T]:
        """Every live item, level by level."""
        return [item for level in self._levels for key in level.turns for item in self._live(level, level.queues[key])]
