"""A priority queue with O(log n) push and pop, O(1) removal, and arrival order kept within a level."""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

T = TypeVar("T")

# Removed entries stay in the heap until popped; rebuild once they outnumber the live ones (amortised O(1)).
_COMPACT_MIN_DEAD = 64


class Entry(Generic[T]):
    """A place in the queue; keep it to remove the item later."""

    __slots__ = ("item", "owner", "rank", "seq")

    def __init__(self, owner: PriorityQueue[T], rank: int, seq: int, item: T):
        self.owner = owner
        self.rank = rank
        self.seq = seq
        self.item: T | None = item


class PriorityQueue(Generic[T]):
    """Lowest rank first; equal ranks leave in arrival order.

    >>> q: PriorityQueue[str] = PriorityQueue(levels=3)
    >>> a, b = q.push("a", rank=2), q.push("b", rank=0)
    >>> q.pop()
    'b'
    >>> q.remove(a); len(q)
    0
    """

    __slots__ = ("_counts", "_dead", "_heap", "_seq")

    def __init__(self, levels: int):
        # (rank, seq, entry): tuples compare in C, and seq is unique, so entries themselves are never compared.
        self._heap: list[tuple[int, int, Entry[T]]] = []
        self._counts = [0] * levels
        self._dead = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap) - self._dead

    def count(self, rank: int) -> int:
        """How many live items wait at this rank."""
        return self._counts[rank]

    def push(self, item: T, rank: int) -> Entry[T]:
        """Queue `item` behind everything of the same or lower rank."""
        seq = next(self._seq)
        entry = Entry(self, rank, seq, item)
        heapq.heappush(self._heap, (rank, seq, entry))
        self._counts[rank] += 1
        return entry

    def pop(self) -> T | None:
        """The first item, or None when empty."""
        heap = self._heap
        while heap:
            entry = heapq.heappop(heap)[2]
            item = entry.item
            if item is None:
                self._dead -= 1
                continue
            entry.item = None
            self._counts[entry.rank] -= 1
            return item
        return None

    def peek_rank(self) -> int | None:
        """The rank of the first item, or None when empty."""
        heap = self._heap
        while heap and heap[0][2].item is None:
            heapq.heappop(heap)
            self._dead -= 1
        return heap[0][0] if heap else None

    def remove(self, entry: Entry[T]) -> bool:
        """Take an item out wherever it stands; False if it already left or is not in this queue."""
        if entry.item is None or entry.owner is not self:
            return False
        entry.item = None
        self._counts[entry.rank] -= 1
        self._dead += 1
        if self._dead > _COMPACT_MIN_DEAD and self._dead > len(self._heap) // 2:
            self._heap = [t for t in self._heap if t[2].item is not None]
            heapq.heapify(self._heap)
            self._dead = 0
        return True

    def position(self, entry: Entry[T]) -> int | None:
        """1-based place of a waiting item (O(n): for status look-ups, never on the dispatch path)."""
        if entry.item is None or entry.owner is not self:
            return None
        key = (entry.rank, entry.seq)
        return 1 + sum(1 for t in self._heap if t[2].item is not None and t[:2] < key)

    def items(self) -> list[T]:
        """Every live item, in no particular order."""
        return [t[2].item for t in self._heap if t[2].item is not None]
