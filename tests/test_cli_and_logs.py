"""The command line (serve flags, status, loadtest) and the log formats, including the access line."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from rich.console import Console

from app.cli.common import default_url
from app.cli.loadtest import parse_mix, spread
from app.cli.main import build_parser, main
from app.cli.status import watch_view
from app.logs import JsonFormatter, TextFormatter
from app.types import Priority
from testkit.gateway import Background, RunningGateway, chat_body, wait_until
from testkit.upstream import FakeUpstream

StartGateway = Callable[..., RunningGateway]


def test_priority_mix_is_parsed_and_spread_in_proportion() -> None:
    mix = parse_mix("high=1,normal=3,low=6")
    assert mix == [(Priority.HIGH, 1), (Priority.NORMAL, 3), (Priority.LOW, 6)]
    order = spread(mix, 100)
    assert Counter(order) == {Priority.HIGH: 10, Priority.NORMAL: 30, Priority.LOW: 60}
    assert Priority.HIGH in order[:10] and Priority.NORMAL in order[:4]  # interleaved, not in blocks
    for bad in ("high=x", "urgent=1", "high=-1", "high=0,low=0"):
        with pytest.raises(ValueError, match="priority-mix"):
            parse_mix(bad)


def test_serve_help_lists_every_setting_with_its_variable_and_default() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for flag, default in (("--max-concurrent-requests", "default: 1"), ("--port", "default: 8091")):
        assert flag in text and default in text
    assert "--rate-limit-rpm" in text and "--log-format" in text and "--api-keys-file" in text


def test_loadtest_and_status_against_a_running_gateway(
    start_gateway: StartGateway, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = start_gateway(max_concurrent_requests=2, rate_limit_rpm=6000)
    main(["loadtest", "--url", gw.url, "--requests", "20", "--concurrency", "4", "--priority-mix", "high=1,low=1"])
    out = capsys.readouterr().out
    assert "20 requests in" in out and "200x10" in out and "200x20" in out
    assert "high" in out and "low" in out and "throughput" in out
    assert gw.scheduler.totals.completed == 20
    assert len(upstream.seen) == 20 and {s.body["max_tokens"] for s in upstream.seen} == {32}
    # Not a terminal here: the table keeps every column and whole cells all the same.
    header = next(line for line in out.splitlines() if "priority" in line and "statuses" in line)
    for column in ("wait p50", "wait p95", "lat p50", "lat p95", "lat p99"):
        assert column in header
    main(["status", "--url", gw.url])
    out = capsys.readouterr().out
    assert "0/2 slots busy" in out and "processed" in out
    backends_row = next(line for line in out.splitlines() if "upstream" in line and "proxy" in line)
    assert "any" in backends_row and "up" in backends_row and "0/2" in backends_row and upstream.base_url in out
    # The nested sections as rows of their own, not raw JSON.
    assert "requests_per_minute.limit" in out and "6000" in out and "paused_seconds" in out
    assert "{" not in out
    main(["status", "--url", gw.url, "--json"])
    assert json.loads(capsys.readouterr().out)["total_processed"] == 20


def test_loadtest_rejects_a_bad_mix() -> None:
    with pytest.raises(SystemExit, match="priority-mix"):
        main(["loadtest", "--priority-mix", "top=1"])


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("app.access.chat", logging.INFO, __file__, 1, "POST %s", ("/v1/chat/completions",), None)
    rec.__dict__.update(extra)
    return rec


def test_log_formats() -> None:
    line = TextFormatter().format(record())
    assert line.endswith("INFO [Chat Completions] POST /v1/chat/completions") and line[10] == "T"
    entry = json.loads(JsonFormatter().format(record(request_id="r1", key="team-a", queue_wait_ms=1.5)))
    assert entry["message"] == "POST /v1/chat/completions" and entry["component"] == "Chat Completions"
    assert (entry["request_id"], entry["key"], entry["queue_wait_ms"], entry["level"]) == ("r1", "team-a", 1.5, "info")
    queue = logging.LogRecord("app.queue", logging.WARNING, __file__, 1, "draining", (), None)
    assert "WARNING [RequestQueue] draining" in TextFormatter().format(queue)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("app.access")]


def test_one_access_line_per_request_with_the_key_name_never_the_key(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway(api_keys="secret-key-1")
    headers = {"Authorization": "Bearer secret-key-1", "X-Priority": "high", "X-Request-ID": "logged-1"}
    with caplog.at_level(logging.INFO, logger="app.access"):
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=headers).status_code == 200
        assert httpx.post(gw.url + "/v1/chat/completions", content=b"{", headers=headers).status_code == 400
        # The line is written once the response has gone out: the client may read it a moment before.
        assert wait_until(lambda: len(access_lines(caplog)) >= 2)
    lines = access_lines(caplog)
    assert len(lines) == 2
    done, bad = lines
    assert (done.request_id, done.key, done.priority, done.outcome, done.status) == (  # type: ignore[attr-defined]
        "logged-1",
        "key-1",
        "high",
        "completed",
        200,
    )
    assert done.queue_wait_ms >= 0 and done.duration_ms > 0  # type: ignore[attr-defined]
    assert (bad.outcome, bad.status) == ("error", 400)  # type: ignore[attr-defined]
    assert "secret-key-1" not in caplog.text


def test_a_forged_line_in_a_request_path_is_written_escaped(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway()
    forged = "/v1/x%0d%0a2026-11-23T16:00:00.000Z%20INFO%20[RequestQueue]%20forged%00%1b[31m"
    with caplog.at_level(logging.INFO, logger="app.access"):
        assert httpx.get(gw.url + forged).status_code == 404
        assert wait_until(lambda: access_lines(caplog))
    (access,) = access_lines(caplog)
    assert "\r\n" in access.getMessage()  # the decoded path, as the record holds it
    line = TextFormatter().format(access)
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\x1b" not in line
    assert "/v1/x\\x0d\\x0a2026-11-23T16:00:00.000Z INFO [RequestQueue] forged\\x00\\x1b[31m" in line
    entry = json.loads(JsonFormatter().format(access))
    assert entry["path"].startswith("/v1/x\r\n")  # JSON escapes it by itself: one line, the path intact


def test_json_lines_leave_out_uvicorns_terminal_colours() -> None:
    entry = json.loads(JsonFormatter().format(record(color_message="\x1b[32mPOST\x1b[0m")))
    assert "color_message" not in entry


def test_status_defaults_to_the_port_serve_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9123")
    assert default_url() == "http://127.0.0.1:9123"
    monkeypatch.setenv("PORT", "not-a-port")
    assert default_url() == "http://127.0.0.1:8091"
    monkeypatch.delenv("PORT")
    assert default_url() == "http://127.0.0.1:8091"


def test_status_watch_draws_the_events_until_the_stream_ends(
    start_gateway: StartGateway, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = start_gateway(max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    upstream.behavior.hang = True
    with Background() as background:
        running = background.post(url, chat_body(), headers={"X-Request-ID": "running-one"})
        assert wait_until(lambda: upstream.active == 1)
        queued = background.post(url, chat_body(), headers={"X-Request-ID": "queued-one", "X-Priority": "low"})
        assert wait_until(lambda: gw.scheduler.waiting == 1)
        with httpx.stream("GET", gw.url + "/v1/queue/events", timeout=10) as events:
            line = next(line for line in events.iter_lines() if line.startswith("data: "))
        console = Console(record=True, width=200)
        console.print(watch_view(json.loads(line[6:]), gw.url))
        drawn = console.export_text()
        assert "1/1 busy" in drawn and "1/100 waiting" in drawn
        assert "running-one" in drawn and "queued-one" in drawn and "low" in drawn

        watcher = threading.Thread(target=main, args=(["status", "--watch", "--url", gw.url],))
        watcher.start()
        time.sleep(1.5)
        assert gw.loop is not None
        gw.loop.call_soon_threadsafe(gw.scheduler.drain)  # the waiting one is answered 503
        assert queued.result().status_code == 503
        upstream.behavior.hang = False
        assert httpx.delete(gw.url + "/v1/queue/request/running-one").status_code == 200
        assert running.result().status_code == 499
        watcher.join(10)
        assert not watcher.is_alive()  # the stream ended with the drain, and so did the view
    assert "draining" in capsys.readouterr().out
