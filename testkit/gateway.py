"""Runs a real gateway (uvicorn, uvloop, httptools) on a loopback port in a thread, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import uvloop
from fastapi import FastAPI

from app.backends.base import Backend
from app.main import create_app
from app.queue.scheduler import Scheduler
from app.server import GatewayServer
from app.settings import Settings, load_settings


class RunningGateway:
    """A gateway serving on 127.0.0.1:<port> until stop()."""

    def __init__(self, settings: Settings, backend: Backend[Any] | None = None, clock: Any = time.time):
        self.settings = settings
        self.app: FastAPI = create_app(settings, backend=backend, clock=clock)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.server = GatewayServer(self.app, freeze_heap=False)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> Scheduler:
        scheduler: Scheduler = self.app.state.scheduler
        return scheduler

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])

        uvloop.run(main())

    def start(self) -> RunningGateway:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.005)
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the gateway's loop and return its result (to read or poke state safely)."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            box.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(5)
        return box[0]

    def drain(self) -> None:
        self.call(self.scheduler.drain)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_settings(**overrides: Any) -> Settings:
    """Settings for a test gateway: no .env read (the tests also clear the settings' variables, see conftest),
    and a DATA_DIR of its own unless one is given."""
    overrides.setdefault("data_dir", fresh_data_dir())
    return load_settings(_env_file=None, **overrides)


def fresh_data_dir() -> str:
    """An empty DATA_DIR for one gateway (a test that restarts one on the same data passes it on itself)."""
    parent = Path(tempfile.gettempdir()) / "llm-queue-gateway-data"
    parent.mkdir(exist_ok=True)
    return tempfile.mkdtemp(dir=parent)


ROOT = Path(__file__).resolve().parent.parent
SETTING_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)


def gateway_process_env(**overrides: str) -> dict[str, str]:
    """The environment of a gateway process a test starts: the caller's, less every setting, plus `overrides`.

    Start the process with cwd=gateway_process_cwd(), where no .env lies, so a user's .env in the checkout
    cannot change what the test sees either.
    """
    env = {name: value for name, value in os.environ.items() if name.upper() not in SETTING_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, "DATA_DIR": fresh_data_dir(), **overrides}


def gateway_process_cwd() -> str:
    """An empty directory to start gateway processes in (no .env there)."""
    path = Path(tempfile.gettempdir()) / "llm-queue-gateway-tests"
    path.mkdir(exist_ok=True)
    (path / ".env").unlink(missing_ok=True)
    return str(path)


def refused_startup(**settings: str) -> list[str]:
    """Start `python -m app` with these settings, expecting it to refuse them: its stderr lines (exit 2 checked)."""
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        env=gateway_process_env(**settings),
        cwd=gateway_process_cwd(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()


class GatewayProcess:
    """`python -m app` on a free loopback port with these settings, its output kept in a file."""

    def __init__(self, **settings: str):
        self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(prefix="llmq-gateway-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            env=gateway_process_env(PORT=str(self.port), **settings),
            cwd=gateway_process_cwd(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> GatewayProcess:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.output()}")
            try:
                return httpx.get(self.url + "/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(ready, timeout=timeout, interval=0.05):
            raise RuntimeError(f"the gateway did not become ready: {self.output()}")
        return self

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


class Background:
    """Requests sent from threads, so a test can queue many and watch them wait."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=64)

    def post(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 30) -> Any:
        return self._pool.submit(httpx.post, url, json=body, headers=headers or {}, timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
