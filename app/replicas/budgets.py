"""The rpm/tpm budgets the replicas share: client keys' and backends' limits kept in Redis, spent there.

Each local bucket is cut to this replica's share of its limit (1/REPLICAS_EXPECTED), which is what it spends
on its own while Redis is out of reach (REDIS_FAILURE_MODE=local).
"""

from __future__ import annotations

from collections.abc import Callable

from app.errors import CoordinationUnavailable, KeyRateLimited
from app.limits.buckets import TokenBucket
from app.limits.keys import KeyAccount
from app.queue.member import Member
from app.replicas.writer import Arg, Command, Writer

Limits = tuple[int, int]  # requests and tokens per minute; 0 for none


class SharedBudgets:
    """Spends and refunds the client keys' shared budgets; knows every key's and member's real limits.

    `run(script, *args)` is the command that runs one of the shared state's scripts; `available()` says
    whether Redis answered last time; `local` is REDIS_FAILURE_MODE=local.
    """

    def __init__(
        self,
        accounts: tuple[KeyAccount, ...],
        replicas_expected: int,
        local: bool,
        writer: Writer,
        run: Callable[..., Command],
        available: Callable[[], bool],
    ):
        self._share = replicas_expected
        self._local = local
        self._writer = writer
        self._run = run
        self._available = available
        self._keys: dict[str, Limits] = {}
        # The backends' RATE_LIMIT_RPM/TPM, by member name and limiter (a reload brings a new limiter).
        self._members: dict[tuple[str, int], Limits] = {}
        for account in accounts:
            rpm = int(account.requests.limit) if account.requests is not None else 0
            tpm = int(account.tokens.limit) if account.tokens is not None else 0
            self._keys[account.name] = (rpm, tpm)
            account.requests = self._cut(account.requests, rpm)
            account.tokens = self._cut(account.tokens, tpm)

    def _cut(self, bucket: TokenBucket | None, limit: int) -> TokenBucket | None:
        if bucket is None or self._share <= 1:
            return bucket
        return TokenBucket(max(1.0, limit / self._share))

    def member_limits(self, member: Member) -> Limits:
        """A member's RATE_LIMIT_RPM/TPM, as the scripts share them; its local buckets are cut to this
        replica's share the first time it is asked of."""
        limiter = member.gate.limiter if member.gate is not None else None
        if limiter is None:
            return 0, 0
        known = self._members.get((member.name, id(limiter)))
        if known is not None:
            return known
        rpm = int(limiter.requests.limit) if limiter.requests is not None else 0
        tpm = int(limiter.tokens.limit) if limiter.tokens is not None else 0
        self._members[member.name, id(limiter)] = rpm, tpm
        limiter.requests = self._cut(limiter.requests, rpm)
        limiter.tokens = self._cut(limiter.tokens, tpm)
        return rpm, tpm

    async def spend(self, key: KeyAccount, cost: int) -> None:
        """Take one request and `cost` tokens of the key's budgets across the replicas, or raise 429
        (KeyRateLimited); without Redis, of its local share (local mode) or raise 503 (closed)."""
        rpm, tpm = self._keys.get(key.name, (0, 0))
        if not rpm and not tpm:
            return
        if not self._available():
            if self._local:
                key.spend(cost)
                return
            raise CoordinationUnavailable()
        try:
            result = await self._writer.call(self._run("spend", key.name, rpm, tpm, 1, cost, "1"))
        except CoordinationUnavailable:
            if self._local:
                key.spend(cost)
                return
            raise
        if result[0]:
            which = result[1]
            retry_after = result[0] / 1000
            limit = rpm if which == "requests" else tpm
            raise KeyRateLimited(
                f"rate limit reached for key {key.name!r}: {limit} {which} per minute across the replicas; "
                f"retry in {retry_after:.1f}s",
                retry_after=retry_after,
            )

    def refund(self, key: KeyAccount, cost: int) -> None:
        """Give back what spend() took for a request that was then refused."""
        rpm, tpm = self._keys.get(key.name, (0, 0))
        if (rpm or tpm) and self._available():
            self._writer.queue(self._run("spend", key.name, rpm, tpm, -1, -cost, "0"))
        elif rpm or tpm:
            key.refund(cost)

    def settle(self, key: KeyAccount, cost: int, used_tokens: int) -> None:
        """A request that spent `cost` tokens ahead used `used_tokens`: the shared tpm budget takes the difference."""
        tpm = self._keys.get(key.name, (0, 0))[1]
        if tpm and used_tokens != cost:
            args: list[Arg] = [key.name, 0, tpm, 0, used_tokens - cost, "0"]
            self._writer.queue(self._run("spend", *args))
