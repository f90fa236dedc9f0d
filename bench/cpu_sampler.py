"""Runs a module (the gateway) with a CPU sampler inside its own process: where its CPU time goes, by file.

    CPU_SAMPLES_OUT=out.json python -m bench.cpu_sampler app

SIGUSR1 starts sampling, SIGUSR2 stops it and writes what it counted to $CPU_SAMPLES_OUT (JSON):
- `files`: samples by the file of their innermost gateway frame (a module of the package app, as
  "app/queue/job.py"; "-" for none: the event loop, uvicorn or aiohttp on their own, and the server's start in
  app/__main__.py, which runs as __main__). Library calls count for the gateway frame that made them.
- `functions`: the same by "file:function".
- `inclusive`: samples with a frame of one of $CPU_SAMPLES_ENTRIES ("app/queue/scheduler.py:submit,...")
  anywhere on their stack: those calls' share of the CPU, everything they call included.
- `gc_seconds`, `cpu_seconds`: time in the cyclic garbage collector (gc.callbacks) and the process's CPU time
  over the same span.

The kernel sends SIGPROF each time the process has used another interval of CPU (ITIMER_PROF: user and
system time, sampled at the scheduler's tick, 250 Hz on many kernels), so samples are spread evenly over the
CPU the process spends, syscalls included, and none over its idle time. Python runs the handler in the main
thread, where the event loop and the whole gateway run, at the next instruction boundary, with the frame
that was running: the stack it reads is the real one. A sampler outside the process, py-spy, reads a
CPython 3.11 stack while it changes, unless it stops the process; stopped at intervals, the process tends to
stop at its next system call, which skews the samples towards the code that makes them.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import signal
import sys
import time
from types import FrameType

_INTERVAL_SECONDS = 0.001  # as often as the kernel allows (one sample per tick when the tick is longer)


def _gateway_path(frame: FrameType) -> str | None:
    """The gateway file a frame runs in, as "app/queue/job.py", or None for any other code. Told by the module's
    name, not the path: a checkout, or a virtual environment, may well sit under a directory named app."""
    module = str(frame.f_globals.get("__name__", ""))
    if module != "app" and not module.startswith("app."):
        return None
    package = frame.f_code.co_filename.endswith("__init__.py")
    return module.replace(".", "/") + ("/__init__.py" if package else ".py")


class Sampler:
    """What the samples of one span counted (see the module's docstring)."""

    def __init__(self, entries: set[tuple[str, str]]):
        self.entries = entries  # (path, function) pairs
        self.files: collections.Counter[str] = collections.Counter()
        self.functions: collections.Counter[str] = collections.Counter()
        self.inclusive = 0
        self.gc_seconds = 0.0
        self._gc_since = 0.0
        self._cpu_from = 0.0

    def sample(self, signum: int, frame: FrameType | None) -> None:
        innermost: str | None = None
        held = False
        while frame is not None:
            path = _gateway_path(frame)
            if path is not None:
                name = frame.f_code.co_name
                if innermost is None:
                    innermost = path
                    self.functions[f"{path}:{name}"] += 1
                if (path, name) in self.entries:
                    held = True
                    break
            frame = frame.f_back
        self.files[innermost or "-"] += 1
        self.inclusive += held

    def collecting(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_since = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_since

    def start(self, signum: int, frame: FrameType | None) -> None:
        self.files.clear()
        self.functions.clear()
        self.inclusive = 0
        self.gc_seconds = 0.0
        self._cpu_from = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, _INTERVAL_SECONDS, _INTERVAL_SECONDS)

    def stop(self, signum: int, frame: FrameType | None) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        counted = {
            "files": self.files,
            "functions": self.functions,
            "inclusive": self.inclusive,
            "gc_seconds": self.gc_seconds,
            "cpu_seconds": time.process_time() - self._cpu_from,
        }
        path = os.environ["CPU_SAMPLES_OUT"]
        with open(path + ".part", "w") as out:
            json.dump(counted, out)
        os.replace(path + ".part", path)  # whoever waits for the file reads it whole


def main() -> None:
    entries = os.environ.get("CPU_SAMPLES_ENTRIES", "")
    sampler = Sampler({(path, name) for path, _, name in (e.rpartition(":") for e in entries.split(",") if e)})
    signal.signal(signal.SIGPROF, sampler.sample)
    signal.signal(signal.SIGUSR1, sampler.start)
    signal.signal(signal.SIGUSR2, sampler.stop)
    gc.callbacks.append(sampler.collecting)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
