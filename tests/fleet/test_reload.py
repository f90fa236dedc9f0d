"""BACKENDS_FILE at startup and on SIGHUP: a bad file stops startup with one line; a reload under load adds and
removes members with nothing lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.fleet.config import BackendsFileError, load_backends_file
from testkit.gateway import (
    chat_body,
    free_port,
    gateway_process_cwd,
    gateway_process_env,
    refused_startup,
    wait_until,
)
from testkit.upstream import FakeUpstream
from tests.fleet.conftest import member


def _write(path: Path, backends: list[dict[str, Any]], **extra: Any) -> None:
    path.write_text(yaml.safe_dump({"backends": backends, **extra}))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("backends: [{name: a, type: proxy}]", "backend 'a': base_url: Field required"),
        ("backends: [{name: a, type: proxy, base_url: ftp://x}]", "backend 'a': base_url: must start with http"),
        ("backends: [{name: a, type: cloud}]", "backend 'a'"),
        ("backends: [{type: local, max_concurrent: 0}]", "backend #1"),
        (
            "backends: [{name: a, type: proxy, base_url: 'http://x/v1'}, {name: a, type: proxy, base_url: 'http://y/v1'}]",
            "appears more than once",
        ),
        (
            "backends: [{name: a, type: proxy, base_url: 'http://x/v1', models: [m]}]\naliases: {b: zz}",
            "no backend serves",
        ),
        (
            "backends: [{name: a, type: proxy, base_url: 'http://x/v1', api_key_env: NOT_SET_ANYWHERE_42}]",
            "NOT_SET_ANYWHERE_42, which is not set",
        ),
        ("backends: [{name: a, type: proxy, base_url: 'http://x/v1', colour: red}]", "backend 'a': colour: Extra"),
        (
            "backends: [{name: a, type: proxy, base_url: 'http://x/v1', max_concurrent: 2, reserved_high_slots: 2}]",
            "backend 'a': reserved_high_slots must be below max_concurrent",
        ),
        ("backends: []", "backends"),
        ("just: [text", "backends.yaml"),
    ],
)
def test_a_bad_backends_file_is_named_with_its_entry_and_problem(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(content)
    with pytest.raises(BackendsFileError) as caught:
        load_backends_file(str(path))
    message = str(caught.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message


def test_a_bad_backends_file_stops_startup_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("backends: [{name: gpu-1, type: proxy, base_url: 'http://x/v1', max_concurrent: -3}]")
    lines = refused_startup(BACKENDS_FILE=str(path))
    assert len(lines) == 1 and str(path) in lines[0] and "gpu-1" in lines[0] and "max_concurrent" in lines[0]


def test_the_api_key_of_a_backend_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("backends: [{name: a, type: proxy, base_url: 'http://x/v1', api_key_env: FLEET_TEST_KEY}]")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEET_TEST_KEY", "sk-from-env")
        entry = load_backends_file(str(path)).backends[0]
        assert entry.type == "proxy" and entry.key == "sk-from-env"


def test_sighup_adds_and_removes_members_under_load_with_nothing_lost(tmp_path: Path) -> None:
    old, kept, new = (FakeUpstream().start() for _ in range(3))
    for upstream in (old, kept, new):
        upstream.behavior.latency = 0.05
    path = tmp_path / "backends.yaml"
    _write(path, [member("old", old, 2), member("kept", kept, 2)])
    port = free_port()
    log = tmp_path / "gateway.log"  # a file, not a pipe: nobody reads a pipe until the end, and it would fill up
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "app"],
            env=gateway_process_env(BACKENDS_FILE=str(path), PORT=str(port), LOG_LEVEL="info"),
            cwd=gateway_process_cwd(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post(url + "/v1/chat/completions", json=chat_body("x")).status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        assert wait_until(lambda: _ready(url), timeout=20)
        for worker in workers:
            worker.start()
        assert wait_until(lambda: len(old.seen) > 5 and len(kept.seen) > 5, timeout=10)
        _write(path, [member("kept", kept, 3), member("new", new, 2)])
        server.send_signal(signal.SIGHUP)
        assert wait_until(lambda: len(new.seen) > 5, timeout=10)
        old_count = len(old.seen)
        time.sleep(0.5)
        assert len(old.seen) == old_count  # removed: it finished what it ran, and takes nothing new
        names = [b["name"] for b in httpx.get(url + "/v1/queue/status").json()["backends"]]
        assert names == ["kept", "new"]

        path.write_text("backends: [{name: broken")  # a bad file on SIGHUP changes nothing
        server.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert server.poll() is None
        served = len(new.seen)
        assert wait_until(lambda: len(new.seen) > served, timeout=5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        output = log.read_text()
        for upstream in (old, kept, new):
            upstream.stop()
    assert statuses and set(statuses) == {200}, output
    assert "backend kept changed; backend new added; backend old removed" in output
    assert "not reloaded, the fleet stays as it was" in output


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready").status_code == 200
    except httpx.HTTPError:
        return False
