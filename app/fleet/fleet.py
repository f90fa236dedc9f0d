"""The fleet's lifecycle: members built from the configuration, their models discovered, the down ones
probed, and a reload (SIGHUP) applied without losing what runs.

The scheduler owns the members' slots and the pools; the fleet owns their backends: it opens and closes them,
and tells the scheduler which members there are.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from app.backends import Backend, BackendResponse, LlamaBackend, ProxyBackend
from app.backends.proxy import without_credentials
from app.errors import BackendNotReady, BreakerOpen, GatewayError
from app.fleet.config import FleetConfig, LocalEntry, ProxyEntry
from app.limits.backoff import Backoff
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.limiter import UpstreamLimiter
from app.metrics import Metrics
from app.queue.gate import DispatchGate
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.settings import Settings

log = logging.getLogger("app.fleet")

Entry = ProxyEntry | LocalEntry


class Fleet:
    """The members behind the queue, as `config` describes them; `backend` replaces the one member's (tests)."""

    def __init__(self, config: FleetConfig, settings: Settings, metrics: Metrics, backend: Backend[Any] | None = None):
        self.config = config
        self._settings = settings
        self._metrics = metrics
        self._given = backend
        self._scheduler: Scheduler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._entries: dict[str, Entry] = {}
        self.members: list[Member] = [self._build(entry, config) for entry in config.backends]

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "Fleet.attach() was not called"
        return self._scheduler

    def attach(self, scheduler: Scheduler) -> None:
        """Serve through `scheduler`: it gets the members whose models are known."""
        self._scheduler = scheduler
        scheduler.roster.on_retired = self._retired
        scheduler.set_members(self._serving(), self.config.aliases)

    def _serving(self) -> list[Member]:
        # A proxy whose models are still to be discovered serves nothing yet.
        return [m for m in self.members if m.models is None or m.models]

    @property
    def single(self) -> Member | None:
        """The one member of a fleet of one the settings describe (today's gateway), else None."""
        return self.members[0] if not self.config.from_file else None

    # Building ---------------------------------------------------------------------------------------------

    def _build(self, entry: Entry, config: FleetConfig) -> Member:
        settings, metrics = self._settings, self._metrics
        proxy = isinstance(entry, ProxyEntry)
        # A proxy always learns its upstream's budgets from its headers; a local model only has the ones set.
        limiter = UpstreamLimiter(entry.rpm, entry.tpm) if proxy or entry.rpm or entry.tpm else None
        threshold = settings.breaker_failure_threshold
        breaker = CircuitBreaker(threshold, settings.breaker_cooldown) if proxy and threshold else None
        retries = None
        if isinstance(entry, ProxyEntry):
            retries = entry.max_retries
            if retries is None:  # alone in its pools, it retries itself; else the pool's others take the retry
                retries = settings.upstream_max_retries if _alone(entry, config) else 0
        backend = self._given or _backend(entry, settings, metrics, limiter, breaker, retries)
        models = entry.models
        if config.from_file and models is None:
            # A local model serves its own name; a proxy's models are asked of it at start.
            models = (getattr(backend, "alias", entry.name),) if isinstance(entry, LocalEntry) else ()
        member = Member(
            entry.name,
            entry.max_concurrent,
            backend=backend,
            kind=entry.type,
            models=models,
            gate=DispatchGate(limiter, breaker, metrics) if limiter is not None or breaker is not None else None,
            base_url=without_credentials(entry.base_url) if isinstance(entry, ProxyEntry) else None,
            series=metrics.backend(entry.name),
            reserved_high=settings.reserved_high_slots
            if entry.reserved_high_slots is None
            else entry.reserved_high_slots,
            parking=parking(entry, settings),
        )
        if breaker is not None:
            breaker.on_change = lambda state: self._breaker_changed(member, state)
        if limiter is not None:
            limiter.on_pause = lambda seconds: self.scheduler.paused(member, seconds)
        self._entries[entry.name] = entry
        return member

    # Running ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every backend and learn the models of proxies that list none; a failure to learn them is retried
        in the background, and the member joins once it answers."""
        await asyncio.gather(*(self._open(member) for member in self.members))
        self.scheduler.set_members(self._serving(), self.config.aliases)

    async def _open(self, member: Member) -> None:
        await member.backend.start()
        if member.models == () and not await self._discover(member):
            self._spawn(self._discover_until_known(member))

    async def _discover(self, member: Member) -> bool:
        try:
            answer = await member.backend.models()
            models = tuple(str(item["id"]) for item in orjson.loads(answer.body)["data"])
        except (GatewayError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("backend %s: could not list its models (%s); asking again", member.name, exc)
            return False
        if not models:
            log.warning("backend %s lists no models; asking again", member.name)
            return False
        member.models = models
        log.info("backend %s serves %s", member.name, ", ".join(models))
        return True

    async def _discover_until_known(self, member: Member) -> None:
        entry = self._entries[member.name]
        interval = entry.probe_interval if isinstance(entry, ProxyEntry) else 2.0
        while not member.retiring and member in self.members:
            await asyncio.sleep(interval)
            if await self._discover(member):
                self.scheduler.set_members(self._serving(), self.config.aliases)
                return

    def _breaker_changed(self, member: Member, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            log.warning("backend %s is down: its circuit breaker opened", member.name)
            if self.config.from_file:
                self._spawn(self._probe(member))
        elif state is BreakerState.CLOSED:
            log.info("backend %s is back", member.name)
        self.scheduler.member_changed(member, state)

    async def _probe(self, member: Member) -> None:
        """GET /v1/models on a down member until it answers; then one real request decides (half open)."""
        entry = self._entries[member.name]
        assert isinstance(entry, ProxyEntry) and member.gate is not None and member.gate.breaker is not None
        breaker = member.gate.breaker
        while breaker.state is BreakerState.OPEN and not member.retiring:
            await asyncio.sleep(entry.probe_interval)
            try:
                await member.backend.health()
            except BackendNotReady:
                continue
            if breaker.state is BreakerState.OPEN:
                log.info("backend %s answers its probe: one request will decide", member.name)
                breaker.answered()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retired(self, member: Member) -> None:
        """A member a reload removed has finished its last request: close its backend."""
        log.info("backend %s removed: its last request has ended", member.name)
        self._spawn(member.backend.aclose())

    async def reload(self, config: FleetConfig) -> list[str]:
        """Serve `config` from now on: new backends join, removed ones finish what they run, changed ones are
        replaced (the old one finishing its requests). What changed, as log lines."""
        old = {member.name: member for member in self.members}
        old_entries = dict(self._entries)
        members: list[Member] = []
        opened: list[Member] = []
        changes = []
        for entry in config.backends:
            current = old.get(entry.name)
            if current is not None and old_entries[entry.name] == entry:
                members.append(current)
                continue
            member = self._build(entry, config)
            members.append(member)
            opened.append(member)
            changes.append(f"backend {entry.name} {'changed' if current is not None else 'added'}")
        changes += [f"backend {name} removed" for name in old if name not in {e.name for e in config.backends}]
        if config.aliases != self.config.aliases:
            changes.append("aliases changed")
        try:
            await asyncio.gather(*(self._open(member) for member in opened))
        except BaseException:
            # A new backend could not start (a model that does not load): the fleet stays as it was.
            self._entries = old_entries
            await asyncio.gather(*(member.backend.aclose() for member in opened), return_exceptions=True)
            raise
        self.config = config
        self.members = members
        self._entries = {entry.name: entry for entry in config.backends}
        self.scheduler.set_members(self._serving(), config.aliases)
        return changes

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        closing = [*self.members, *self.scheduler.roster.retiring]
        await asyncio.gather(*(member.backend.aclose() for member in closing), return_exceptions=True)

    # Answers ----------------------------------------------------------------------------------------------

    async def models(self) -> BackendResponse:
        """/v1/models: a fleet of one's backend's own list; a fleet's every model and alias."""
        single = self.single
        if single is not None:
            answer: BackendResponse = await single.backend.models()
            return answer
        owners: dict[str, str] = {}
        for member in self.members:
            for model in member.models or ():
                owners.setdefault(model, member.kind)
        for alias, served in self.config.aliases.items():
            if served in owners:
                owners.setdefault(alias, owners[served])
        data = [{"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in owners.items()]
        return BackendResponse(200, orjson.dumps({"object": "list", "data": data}))

    async def health(self) -> None:
        """Return if the fleet can serve: its one backend answers, or any member of a fleet that is not down."""
        single = self.single
        if single is not None:
            breaker = single.gate.breaker if single.gate is not None else None
            if breaker is not None and breaker.state is BreakerState.OPEN:
                raise BreakerOpen(
                    f"the circuit breaker is open after {breaker.failures} upstream failures in a row",
                    retry_after=breaker.retry_after(),
                )
            await single.backend.health()
            return
        candidates = [member for member in self.members if not member.down]
        results = await asyncio.gather(*(m.backend.health() for m in candidates), return_exceptions=True)
        if not any(result is None for result in results):
            raise BackendNotReady("no backend of the fleet answers")


def _backend(
    entry: Entry,
    settings: Settings,
    metrics: Metrics,
    limiter: UpstreamLimiter | None,
    breaker: CircuitBreaker | None,
    max_retries: int | None,
) -> Backend[Any]:
    """The backend an entry describes, the settings filling in what it leaves out; a proxy informs the limiter
    and the breaker of every upstream answer, and retries `max_retries` times on the same upstream."""
    if isinstance(entry, LocalEntry):
        return LlamaBackend(
            model_path=entry.model_path,
            alias=entry.models[0] if entry.models else settings.model_alias,
            n_ctx=entry.n_ctx,
            n_seq=entry.max_concurrent,
            n_threads=entry.n_threads,
            n_gpu_layers=entry.n_gpu_layers,
            chat_template=entry.chat_template,
            default_max_tokens=settings.default_max_tokens,
            n_parked=parking(entry, settings),
        )
    return ProxyBackend(
        base_url=entry.base_url,
        api_key=entry.key,
        pool_size=entry.max_concurrent,
        connect_timeout=entry.connect_timeout or settings.upstream_connect_timeout,
        read_timeout=entry.read_timeout or settings.upstream_read_timeout,
        metrics=metrics,
        max_retries=settings.upstream_max_retries if max_retries is None else max_retries,
        retry_on_timeout=(
            settings.upstream_retry_on_timeout if entry.retry_on_timeout is None else entry.retry_on_timeout
        ),
        max_response_bytes=settings.max_response_bytes,
        backoff=Backoff(base=settings.upstream_retry_backoff, cap=settings.upstream_retry_max_backoff),
        limiter=limiter,
        breaker=breaker,
    )


def parking(entry: Entry, settings: Settings) -> int:
    """Requests a backend may hold parked at once: half its slots, rounded up, for a local model with
    preemption on (PREEMPTION and PREEMPT_MAX); none for a proxy, whose requests cannot be paused."""
    if not isinstance(entry, LocalEntry) or not settings.preempt_max:
        return 0
    wanted = settings.preemption if entry.preemption is None else entry.preemption
    return -(-entry.max_concurrent // 2) if wanted else 0


def _alone(entry: ProxyEntry, config: FleetConfig) -> bool:
    """Whether no other backend of `config` serves a model `entry` serves (unknown models: it is alone only
    in a fleet of one)."""
    if entry.models is None:
        return len(config.backends) == 1
    others = {model for other in config.backends if other is not entry for model in other.models or ()}
    return not others.intersection(entry.models)
