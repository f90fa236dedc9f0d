"""Hostile clients against one gateway process: what each costs it, and whether /health still answers.

    python -m bench.connections_bench                   # this checkout
    python -m bench.connections_bench --root /tmp/old   # another checkout of the gateway (before/after)

Five attacks, each from its own sockets, against a gateway proxying a fake upstream, run with an open-files
limit of --nofile:
  big header     one 1 MiB header on GET /health: the status it gets
  unterminated   a header line that never ends, up to 200 MB: bytes taken before the gateway closes, its RSS
                 growth, and the slowest /health answer meanwhile
  slow headers   a request's headers at one byte per 0.5 s: seconds until the gateway lets go (capped)
  slow body      a completion whose body comes at one byte per 0.5 s: the same
  idle flood     --idle connections that send nothing: does /health answer, what does a completion get, and
                 how many descriptors the gateway holds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import gateway_process
from testkit.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def status_of(sock: socket.socket) -> int | None:
    try:
        head = sock.recv(65536)
    except OSError:
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/") else None


def health(url: str, timeout: float = 3.0) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        status: int | None = httpx.get(url + "/health", timeout=timeout).status_code
    except httpx.HTTPError:
        status = None
    return status, time.monotonic() - started


def big_header(url: str) -> dict[str, Any]:
    with connect(url) as sock:
        with contextlib.suppress(OSError):  # the gateway may close before it has read everything
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (1 << 20) + b"\r\n\r\n")
        return {"status": status_of(sock)}


def unterminated(url: str, pid: int, total: int = 200 << 20) -> dict[str, Any]:
    before = rss_mb(pid)
    peak = before
    sent = 0
    done = threading.Event()

    def send() -> None:
        nonlocal sent
        with connect(url) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
                chunk = b"a" * (1 << 20)
                while sent < total:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    slowest = 0.0
    while not done.is_set():
        _, took = health(url, timeout=10)
        slowest = max(slowest, took)
        peak = max(peak, rss_mb(pid))
        time.sleep(0.05)
    thread.join()
    return {"sent_mb": round(sent / 2**20, 1), "rss_growth_mb": round(peak - before, 1), "slowest_health_s": slowest}


def trickle(url: str, head: bytes, rest: bytes, cap: float) -> dict[str, Any]:
    """Send `head` at once, then `rest` a byte per 0.5 s: seconds until the gateway closes or answers."""
    started = time.monotonic()
    with connect(url) as sock:
        sock.sendall(head)
        sock.settimeout(0.5)
        for byte in rest:
            if time.monotonic() - started > cap:
                return {"held_s": round(time.monotonic() - started, 1), "closed": False, "status": None}
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            status = int(data.split()[1]) if data.startswith(b"HTTP/") else None
            return {"held_s": round(time.monotonic() - started, 1), "closed": True, "status": status}
        return {"held_s": round(time.monotonic() - started, 1), "closed": True, "status": None}


def slow_headers(url: str, cap: float) -> dict[str, Any]:
    return trickle(url, b"", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n", cap)


def slow_body(url: str, cap: float) -> dict[str, Any]:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * 1000 + b'"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    return trickle(url, head, body, cap)


def idle_flood(url: str, pid: int, count: int) -> dict[str, Any]:
    sockets: list[socket.socket] = []
    opened = 0
    try:
        for _ in range(count):
            try:
                sockets.append(connect(url))
                opened += 1
            except OSError:
                break
        time.sleep(0.5)
        held = descriptors(pid)
        health_status, health_s = health(url)
        try:
            completion: int | None = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                timeout=3,
            ).status_code
        except httpx.HTTPError:
            completion = None
    finally:
        for sock in sockets:
            sock.close()
    return {
        "opened": opened,
        "gateway_fds": held,
        "health": health_status,
        "health_s": round(health_s, 3),
        "completion": completion,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout of the gateway to run")
    parser.add_argument("--nofile", type=int, default=1024, help="the gateway's open-files limit")
    parser.add_argument("--idle", type=int, default=1500, help="idle connections to open")
    parser.add_argument("--cap", type=float, default=40.0, help="seconds a slow client is followed at most")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    upstream = FakeUpstream().start()
    process, url = gateway_process(
        args.root,
        "connections_gateway",
        lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile)),
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        LOG_LEVEL="warning",
    )
    try:
        print(f"gateway: {args.root} (open-files limit {args.nofile})", flush=True)
        print("big header    ", big_header(url), flush=True)
        print("unterminated  ", unterminated(url, process.pid), flush=True)
        print("slow headers  ", slow_headers(url, args.cap), flush=True)
        print("slow body     ", slow_body(url, args.cap), flush=True)
        print("idle flood    ", idle_flood(url, process.pid, args.idle), flush=True)
        print("after         ", {"health": health(url)[0], "rss_mb": round(rss_mb(process.pid), 1)}, flush=True)
    finally:
        process.terminate()
        process.wait(30)
        upstream.stop()


if __name__ == "__main__":
    main()
