"""What the scheduler tells the replicas' shared queue (app.replicas) of the requests in shared pools."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from app.limits.keys import KeyAccount
    from app.queue.job import Job
    from app.queue.member import Member


class SharedQueue(Protocol):
    """The shared side of a pool whose members all replicas use: tickets, leases and pauses live in Redis.

    A request of such a pool waits in its local queue (for status, cancels and timeouts) and holds a
    ticket in the shared one; it is dispatched when the shared queue grants its ticket a member's slot.
    """

    async def admit(self, job: Job) -> None:
        """Give `job`, just submitted, its ticket; raise what refuses it (the scheduler has forgotten it then)."""

    async def spend(self, key: KeyAccount, cost: int) -> None:
        """Take one request and `cost` tokens of the key's shared budgets, or raise 429 (KeyRateLimited)."""

    def refund(self, key: KeyAccount, cost: int) -> None:
        """Give back what spend() took for a request that was then refused."""

    def finished(self, job: Job, used_tokens: int | None) -> None:
        """`job` ended: its ticket or lease goes, its final record is kept for every replica to show."""

    def requeue(self, job: Job, avoid: Member) -> None:
        """`job` failed at `avoid` before its client saw a byte: its lease goes, a ticket at the front returns."""

    def fleet_changed(self) -> None:
        """The members or their pools changed (a reload)."""

    def pause(self, member: Member, seconds: float) -> None:
        """`member`'s upstream asked for a pause (429, an exhausted budget, an open breaker): for all replicas."""
