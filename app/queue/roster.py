"""The fleet as the scheduler sees it: its members, those a reload removed, the model aliases, and the pools
the members' models form.

A reload replaces the members; a pool keeps its queue while some member still serves its model. A member left
out retires: it takes no new work, and is closed once nothing of its own runs or waits parked there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from app.errors import InvalidRequest, ModelNotFound
from app.queue.gate import DispatchGate
from app.queue.member import Member
from app.queue.pool import Pool, Routing
from app.queue.slots import Slot
from app.types import Priority

ANY_MODEL = "*"  # the pool of members that serve any model name (the fleet of one the settings describe)


class Roster:
    """The members by name and the pools by model; `retiring` holds the removed members still at work."""

    __slots__ = ("aliases", "member_pools", "members", "on_retired", "pool_list", "pools", "retiring", "routing")

    def __init__(self, routing: Routing = Routing.AFFINITY):
        self.routing = routing
        self.members: dict[str, Member] = {}
        self.retiring: list[Member] = []
        self.aliases: dict[str, str] = {}
        self.pools: dict[str, Pool] = {}  # by model name, ANY_MODEL included
        self.pool_list: tuple[Pool, ...] = ()  # the same pools, for the dispatch loop
        self.member_pools: dict[Member, tuple[Pool, ...]] = {}  # the pools each member serves
        self.on_retired: Callable[[Member], object] = lambda _: None  # a removed member's last request ended

    def replace(self, members: list[Member], aliases: Mapping[str, str] | None = None) -> list[Pool]:
        """Serve with these members from now on; the pools no member serves any more, whose waiting requests
        are to be answered.

        A pool whose model is still served keeps its queue and forgets the members that left it.
        """
        kept = {member.name: member for member in members}
        for member in [*self.members.values(), *self.retiring]:
            if kept.get(member.name) is not member and member not in self.retiring:
                member.retiring = True
                self.retiring.append(member)
        self.members = kept
        self.aliases = dict(aliases or {})
        pools: dict[str, Pool] = {}
        for member in members:
            for model in member.models if member.models is not None else (ANY_MODEL,):
                pool = pools.get(model)
                if pool is None:
                    pool = pools[model] = self.pools.get(model) or Pool(model, len(Priority), self.routing)
                    pool.members = []
                pool.members.append(member)
        closed = []
        for model, pool in self.pools.items():
            if model not in pools:
                closed.append(pool)
            else:
                for gone in (m for m in pool.members if m not in pools[model].members):
                    pool.forget(gone)
        self.pools = pools
        self.pool_list = tuple(pools.values())
        self.member_pools = {m: tuple(p for p in self.pool_list if m in p.members) for m in members}
        for member in list(self.retiring):
            self.check_retired(member)
        return closed

    def share(self, sharing: bool, replicas: int | None = None) -> None:
        """Mark which pools the replicas' shared queue dispatches (`sharing`: those whose members are all
        proxies, since an in-process model is this replica's own); with `replicas`, each member serves with
        1/`replicas` of its slots from now (all of them at 1), the rest withheld."""
        for pool in self.pool_list:
            pool.shared = sharing and all(member.kind == "proxy" for member in pool.members)
        if replicas is None:
            return
        for member in self.members.values():
            alone = max(1, -(-member.max_concurrent // replicas))
            member.withheld = member.max_concurrent - alone

    def check_retired(self, member: Member) -> None:
        """Close `member` if it is retiring and nothing of its own is left there (called as its work ends)."""
        if member.retiring and not member.holds_work:
            self.retiring.remove(member)
            if member.gate is not None:
                member.gate.close()
            self.on_retired(member)

    def pool_for(self, model: str | None) -> Pool:
        """The pool that serves `model` (after aliases): 404 model_not_found if none does."""
        pools = self.pools
        if len(pools) == 1 and ANY_MODEL in pools:  # a fleet of one that declares no models: any name
            return pools[ANY_MODEL]
        if model is None:
            if len(pools) == 1:
                return self.pool_list[0]
            raise InvalidRequest("model is required: this gateway serves several models", param="model")
        pool = pools.get(self.aliases.get(model, model)) or pools.get(ANY_MODEL)
        if pool is None:
            raise ModelNotFound(model)
        return pool

    def everyone(self) -> list[Member]:
        """The members, then those retiring."""
        return [*self.members.values(), *self.retiring]

    def close(self) -> None:
        """Close every member's gate (its hold timer); the gateway stops."""
        for member in self.everyone():
            if member.gate is not None:
                member.gate.close()

    # Reading ----------------------------------------------------------------------------------------------

    @property
    def gate(self) -> DispatchGate | None:
        """The gate of a fleet of one; None with several members (each has its own)."""
        members = self.members
        return next(iter(members.values())).gate if len(members) == 1 else None

    @property
    def max_concurrent(self) -> int:
        """Requests the fleet runs at once."""
        return sum(member.max_concurrent for member in self.members.values())

    @property
    def in_flight(self) -> int:
        """Slots busy at the backends now (what max_concurrent bounds: a request of n choices at the local
        model holds n of them)."""
        return sum(member.slots.busy for member in self.everyone())

    @property
    def processing(self) -> int:
        """Requests at the backends now, each counted once however many slots it holds."""
        return sum(
            1 for m in self.everyone() for slot in m.slots.slots if slot.job is not None and slot.job.slot is slot
        )

    @property
    def slots(self) -> list[Slot]:
        """The backends' slots, busy or not, member by member."""
        return [slot for member in self.members.values() for slot in member.slots.slots]

    def backends_in_flight(self) -> dict[str, int]:
        """Slots busy at each backend, by name (a member being replaced counts with its successor)."""
        counts: dict[str, int] = {}
        for member in self.everyone():
            counts[member.name] = counts.get(member.name, 0) + member.slots.busy
        return counts
