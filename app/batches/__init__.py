"""Work that outlives a request: files, batches, background requests and webhooks, kept in SQLite under DATA_DIR.

Persisted, built on top of the queue: every line and background request goes through the completion service
like any other request. Persistence is one module (store), as is each idea: files, validation, runner,
background, webhooks; objects holds OpenAI's shapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from app.batches.background import BackgroundRequests
from app.batches.files import Files
from app.batches.runner import BatchRunner
from app.batches.store import Store
from app.batches.webhooks import Target, Webhooks
from app.errors import Unauthorized
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue.service import CompletionService
from app.settings import Settings


class Persisted:
    """The database and the services that keep their work in it, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        service: CompletionService,
        accounts: Mapping[str, KeyAccount],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ):
        data = Path(settings.data_dir)
        account = _owner_account(accounts)
        self.store = Store(data / "gateway.sqlite3")
        self.files = Files(self.store, data / "files", settings.file_max_bytes, clock)
        self.webhooks = Webhooks(
            self.store, _webhook_target(settings, accounts), settings.webhook_retry_seconds, metrics, clock
        )
        self.batches = BatchRunner(self.store, self.files, service, settings, account, self.webhooks, metrics, clock)
        self.background = BackgroundRequests(self.store, service, settings, account, self.webhooks, clock)
        metrics.watch_batches(lambda: self.batches.statuses, lambda: self.webhooks.counts.get("pending", 0))

    async def start(self) -> None:
        """Open the database and take up what a previous run left unfinished."""
        await self.store.open()
        await self.files.start()
        await self.webhooks.start()
        await self.batches.start()
        await self.background.start()

    async def aclose(self) -> None:
        """Stop; what did not end stays in the database for the next start."""
        await self.batches.aclose()
        await self.background.aclose()
        await self.webhooks.aclose()
        await self.store.aclose()


def _owner_account(accounts: Mapping[str, KeyAccount]) -> Callable[[str], KeyAccount | None]:
    """The account of the key a batch or background request belongs to ('': authentication off)."""

    def account(owner: str) -> KeyAccount | None:
        if not owner and not accounts:
            return None
        found = accounts.get(owner)
        if found is None:
            raise Unauthorized(f"the key {owner!r} that sent this request is no longer configured")
        return found

    return account


def _webhook_target(settings: Settings, accounts: Mapping[str, KeyAccount]) -> Callable[[str], Target | None]:
    """Where an owner's events go: its key's own webhook, else WEBHOOK_URL, else nowhere."""
    url, secret = settings.webhook_url, settings.webhook_secret
    default = (url, secret) if url and secret else None

    def target(owner: str) -> Target | None:
        found = accounts.get(owner)
        return found.webhook if found is not None and found.webhook is not None else default

    return target
