"""The backend's concurrency slots (the worker pool): which are busy, with what, and how they fared."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.queue.job import Job


class Slot:
    """One of MAX_CONCURRENT_REQUESTS places at the backend."""

    __slots__ = ("errors", "id", "job", "processed")

    def __init__(self, id: int):
        self.id = id
        self.job: Job | None = None
        self.processed = 0
        self.errors = 0


class SlotPool:
    """A fixed set of slots; take() and give() are O(1)."""

    __slots__ = ("idle", "slots")

    def __init__(self, size: int):
        self.slots = [Slot(i) for i in range(size)]
        # The idle slots, read (truthy when any) on every dispatch. Reversed so slot 0 is handed out first:
        # an idle gateway shows its work on the first workers.
        self.idle = list(reversed(self.slots))

    @property
    def busy(self) -> int:
        """How many slots hold a request."""
        return len(self.slots) - len(self.idle)

    def take(self, job: Job) -> Slot:
        """Give `job` an idle slot; the caller checks `idle` first."""
        slot = self.idle.pop()
        slot.job = job
        return slot

    def vacate(self, slot: Slot) -> None:
        """Return a slot whose request was parked: it has not ended, so nothing is counted."""
        slot.job = None
        self.idle.append(slot)

    def give(self, slot: Slot, ok: bool) -> None:
        """Return a slot after its request ended, well or not."""
        slot.job = None
        if ok:
            slot.processed += 1
        else:
            slot.errors += 1
        self.idle.append(slot)
