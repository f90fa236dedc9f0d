"""`llm-queue-gateway batch ...` against a running gateway."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from app.cli.main import main
from testkit.gateway import RunningGateway

from .conftest import chat_line, jsonl


def test_submit_wait_list_status_download_and_cancel(
    start_gateway: Callable[..., RunningGateway], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = start_gateway(API_KEYS="sk-cli")
    flags = ["--url", gateway.url, "--api-key", "sk-cli"]
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line("a"), chat_line("b"), chat_line("c", max_tokens=-1)]))
    main(["batch", "submit", str(source), "--wait", *flags])
    captured = capsys.readouterr()
    batch_id = captured.out.strip().splitlines()[-1]
    assert batch_id.startswith("batch_") and "2 completed, 1 failed of 3" in captured.err

    main(["batch", "list", *flags])
    assert batch_id in capsys.readouterr().out
    main(["batch", "status", batch_id, *flags])
    assert orjson.loads(capsys.readouterr().out)["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    output = tmp_path / "output.jsonl"
    main(["batch", "download", batch_id, "-o", str(output), *flags])
    assert sorted(orjson.loads(line)["custom_id"] for line in output.read_text().splitlines()) == ["a", "b"]
    main(["batch", "download", batch_id, "--errors", *flags])
    assert orjson.loads(capsys.readouterr().out)["custom_id"] == "c"
    with pytest.raises(SystemExit, match="409"):
        main(["batch", "cancel", batch_id, *flags])
    with pytest.raises(SystemExit, match="no such file"):
        main(["batch", "submit", str(tmp_path / "missing.jsonl"), *flags])
    with pytest.raises(SystemExit, match="401"):
        main(["batch", "list", "--url", gateway.url, "--api-key", "wrong"])
