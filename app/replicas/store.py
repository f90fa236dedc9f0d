"""The replicas' shared state in Redis: the Lua scripts that change it, each a check-and-take in one step.

Keys, under REDIS_PREFIX (P):
- `P:q:<model>` the model pool's waiting tickets, a sorted set scored level, then turn (per-key round robin),
  ties by arrival; `P:age:<model>` their next promotion times (QUEUE_AGING_SECONDS); `P:turns:<model>` each
  level's round and each key's last turn there.
- `P:t:<ticket>` a ticket: its replica, pool, level, key, cost, request id, and the member once granted.
- `P:l:<member>` a backend's leases: the tickets running there, scored by when the lease expires.
- `P:b:<member>` its RATE_LIMIT_RPM/TPM buckets, `P:pause:<member>` a pause its upstream asked for.
- `P:kb:<key>` a client key's rpm/tpm buckets, `P:kw` its waiting tickets (max_queued).
- `P:rep:<replica>` a replica's description, alive for LEASE_TTL; `P:reps` their ids; `P:in:<replica>` its
  inbox (grants, cancels, lookups from other replicas); `P:mine:<replica>` the tickets it holds.
- `P:id:<request id>` the replica holding each key's live request of that id; `P:h:<request id>` the final
  records, kept REQUEST_HISTORY_TTL, the newest REQUEST_HISTORY_SIZE of them (`P:hz`).

The request itself, its body and its connection, stay on the replica that received it: only its ticket is
shared. A single Redis (or a primary with replicas) is assumed, not Redis Cluster.
"""

from __future__ import annotations

from importlib import resources

SCRIPTS = ("enqueue", "release", "withdraw", "heartbeat", "rejoin", "view", "spend")


class Store:
    """The shared state's key names under one prefix, and the text of each script (app/replicas/lua)."""

    __slots__ = ("prefix", "scripts")

    def __init__(self, prefix: str):
        self.prefix = prefix
        lua = resources.files("app.replicas") / "lua"
        common = (lua / "common.lua").read_text()
        self.scripts = {name: common + "\n" + (lua / f"{name}.lua").read_text() for name in SCRIPTS}

    def key(self, *parts: str) -> str:
        """The Redis key of these parts under the prefix."""
        return ":".join((self.prefix, *parts))
