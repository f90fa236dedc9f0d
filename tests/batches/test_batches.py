"""The Batch API end to end through the official SDK, against a fake upstream on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from testkit.clock import FakeClock
from testkit.gateway import Background, RunningGateway, chat_body, gateway_settings, wait_until
from testkit.upstream import FakeUpstream

from .conftest import chat_line, client, jsonl, lines_of, submit, upload, wait_status


def test_a_batch_runs_through_the_sdk_and_its_files_read_back(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway()
    sdk = client(gateway.url)
    lines = [chat_line(f"r{n}") for n in range(12)]
    lines.append(chat_line("bad-max-tokens", max_tokens=-1))  # refused by the gateway: an answer all the same
    created = submit(sdk, lines, metadata={"job": "nightly"})
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    done = wait_status(sdk, created.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (13, 12, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.expires_at
    output = lines_of(sdk, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"r{n}" for n in range(12)]
    first = output[0]
    assert first["error"] is None and first["id"].startswith("batch_req_")
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"] == first["id"]
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "echo: r0"
    (failed,) = lines_of(sdk, done.error_file_id)
    assert failed["custom_id"] == "bad-max-tokens" and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["param"] == "max_tokens"
    # The lists, newest first, and the output file among the caller's files.
    assert [b.id for b in sdk.batches.list().data] == [created.id]
    files = {f.id: f for f in sdk.files.list().data}
    assert files[done.output_file_id].purpose == "batch_output"
    assert files[created.input_file_id].purpose == "batch"
    # A line's request was an ordinary one of the queue, at the batch level.
    record = httpx.get(f"{gateway.url}/v1/queue/request/{first['id']}").json()
    assert record["priority"] == "batch" and record["status"] == "completed"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_batches{status="completed"} 1.0' in metrics
    assert 'gateway_batch_lines_total{outcome="completed"} 12.0' in metrics
    assert 'gateway_batch_lines_total{outcome="failed"} 1.0' in metrics


def test_the_upstreams_errors_are_the_lines_answers(
    start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream
) -> None:
    upstream.behavior.status = 422
    gateway = start_gateway()
    sdk = client(gateway.url)
    done = wait_status(sdk, submit(sdk, [chat_line("a"), chat_line("b")]).id)
    assert done.status == "completed" and done.output_file_id is None
    errors = lines_of(sdk, done.error_file_id)
    assert sorted(line["custom_id"] for line in errors) == ["a", "b"]
    assert {line["response"]["status_code"] for line in errors} == {422}


def test_files_routes_and_their_limits(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(FILE_MAX_BYTES=1000)
    sdk = client(gateway.url)
    file = upload(sdk, jsonl([chat_line("x")]), name="mine.jsonl")
    assert (file.object, file.purpose, file.filename, file.status) == ("file", "batch", "mine.jsonl", "processed")
    assert sdk.files.retrieve(file.id).bytes == file.bytes
    assert sdk.files.content(file.id).content == jsonl([chat_line("x")])
    with pytest.raises(openai.APIStatusError) as too_large:
        upload(sdk, b"x" * 1001)
    assert too_large.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as purpose:
        sdk.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
    not_a_form = httpx.post(gateway.url + "/v1/files", content=b"{}", headers={"content-type": "application/json"})
    assert not_a_form.status_code == 400 and not_a_form.json()["error"]["type"] == "invalid_request_error"
    no_file = httpx.post(gateway.url + "/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    deleted = sdk.files.delete(file.id)
    assert deleted.deleted and deleted.id == file.id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(file.id)
    assert [f.id for f in sdk.files.list().data] == []


@pytest.mark.parametrize(
    ("content", "code", "line"),
    [
        (jsonl([chat_line("a")]) + b"not json\n", "invalid_json_line", 2),
        (jsonl([chat_line("a"), chat_line("a")]), "duplicate_custom_id", 2),
        (jsonl([{**chat_line("a"), "method": "GET"}]), "invalid_method", 1),
        (jsonl([{**chat_line("a"), "url": "/v1/completions"}]), "mismatched_endpoint", 1),
        (jsonl([{**chat_line("a"), "body": "hello"}]), "invalid_request", 1),
        (jsonl([chat_line("a", stream=True)]), "invalid_request", 1),
        (jsonl([{"method": "POST", "url": "/v1/chat/completions", "body": {}}]), "missing_required_parameter", 1),
        (b"\n\n", "empty_file", None),
    ],
)
def test_a_bad_input_file_fails_the_batch_with_its_errors(
    start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream, content: bytes, code: str, line: int | None
) -> None:
    gateway = start_gateway()
    sdk = client(gateway.url)
    file = upload(sdk, content)
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_status(sdk, batch.id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.errors is not None and failed.errors.data
    assert (failed.errors.data[0].code, failed.errors.data[0].line) == (code, line)
    assert not upstream.seen  # nothing of a failed batch runs


def test_bad_batch_parameters_are_400s_and_unknown_ids_404s(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway()
    sdk = client(gateway.url)
    file = upload(sdk, jsonl([chat_line("a")]))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/moderations"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"input_file_id": 7}, "input_file_id"),
    ]
    for change, param in cases:
        body = {"input_file_id": file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
        answer = httpx.post(gateway.url + "/v1/batches", json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param
    assert httpx.post(gateway.url + "/v1/batches", content=b"{").status_code == 400
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.cancel("batch_nope")


def test_interactive_requests_go_before_any_further_batch_line(
    start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream
) -> None:
    upstream.behavior.latency = 0.3
    gateway = start_gateway(MAX_CONCURRENT_REQUESTS=1, BATCH_MAX_IN_FLIGHT=4)
    sdk = client(gateway.url)
    batch = submit(sdk, [chat_line(f"r{n}") for n in range(8)])
    assert wait_until(lambda: upstream.active == 1, timeout=10)
    url = gateway.url + "/v1/chat/completions"
    with Background() as background:
        answers = [
            background.post(url, chat_body(f"interactive-{p}"), {"X-Priority": p}) for p in ("low", "normal", "high")
        ]
        assert wait_until(lambda: gateway.scheduler.waiting_room.in_queue >= 6, timeout=5)  # 3 interactive + 3 lines
        assert all(answer.result().status_code == 200 for answer in answers)
    wait_status(sdk, batch.id)
    order = [seen.body["messages"][0]["content"] for seen in upstream.seen]
    first = order.index("interactive-high")
    assert order[first : first + 3] == ["interactive-high", "interactive-normal", "interactive-low"]
    assert all(content.startswith("r") for content in order[:first]) and first <= 1
    assert len(order) == 11


def test_cancel_mid_run_keeps_what_ran_and_reports_the_rest(
    start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream
) -> None:
    upstream.behavior.latency = 0.2
    gateway = start_gateway(MAX_CONCURRENT_REQUESTS=1, BATCH_MAX_IN_FLIGHT=3)
    sdk = client(gateway.url)
    batch = submit(sdk, [chat_line(f"r{n}") for n in range(10)])
    wait_until(lambda: (sdk.batches.retrieve(batch.id).request_counts or _none()).completed >= 2, timeout=10)
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait_status(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    output = lines_of(sdk, done.output_file_id)
    errors = lines_of(sdk, done.error_file_id)
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(f"r{n}" for n in range(10))  # each once
    assert len(output) >= 2 and errors and {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert len(upstream.seen) == len(output)  # what had not reached the upstream was withdrawn, not run
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(batch.id)


def test_a_batch_expires_when_its_window_ends(upstream: FakeUpstream) -> None:
    upstream.behavior.latency = 0.2
    clock = FakeClock(time.time())
    settings = gateway_settings(
        backend="proxy",
        upstream_base_url=upstream.base_url,
        max_concurrent_requests=1,
        batch_max_in_flight=2,
        batch_completion_windows="24h,1h",
    )
    gateway = RunningGateway(settings, clock=clock).start()
    try:
        sdk = client(gateway.url)
        batch = submit(sdk, [chat_line(f"r{n}") for n in range(8)], window="1h")
        assert batch.expires_at == batch.created_at + 3600
        wait_until(lambda: (sdk.batches.retrieve(batch.id).request_counts or _none()).completed >= 1, timeout=10)
        clock.advance(3601)
        done = wait_status(sdk, batch.id, timeout=10)
        assert done.status == "expired" and done.expired_at is not None
        output, errors = lines_of(sdk, done.output_file_id), lines_of(sdk, done.error_file_id)
        assert sorted(line["custom_id"] for line in output + errors) == sorted(f"r{n}" for n in range(8))
        assert output and {line["error"]["code"] for line in errors} == {"batch_expired"}
        assert all(line["response"] is None for line in errors)
    finally:
        gateway.stop()


def test_files_and_batches_belong_to_their_key(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(API_KEYS="key-a,key-b")
    mine, theirs = client(gateway.url, "key-a"), client(gateway.url, "key-b")
    batch = submit(mine, [chat_line("a")])
    done = wait_status(mine, batch.id)
    for call in (
        lambda: theirs.batches.retrieve(batch.id),
        lambda: theirs.batches.cancel(batch.id),
        lambda: theirs.files.retrieve(batch.input_file_id),
        lambda: theirs.files.content(done.output_file_id),
        lambda: theirs.files.delete(batch.input_file_id),
        lambda: theirs.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert theirs.batches.list().data == [] and theirs.files.list().data == []
    assert [b.id for b in mine.batches.list().data] == [batch.id]
    assert httpx.get(gateway.url + "/v1/batches").status_code == 401


def test_pages_of_batches(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway()
    sdk = client(gateway.url)
    ids = [submit(sdk, [chat_line("a")]).id for _ in range(3)]
    for batch in ids:
        wait_status(sdk, batch)
    first = sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    rest = sdk.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == ids[:1] and not rest.has_more
    assert [b.id for b in sdk.batches.list(limit=1)] == ids[::-1]  # the SDK follows the pages


def _none() -> Any:
    class Zero:
        completed = 0

    return Zero()


def test_waiting_lines_take_no_place_of_the_keys_or_the_queues(
    start_gateway: Callable[..., RunningGateway], upstream: FakeUpstream, tmp_path: Any
) -> None:
    upstream.behavior.latency = 0.3
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: [{key: sk-team, name: team, max_queued: 1}]\n")
    gateway = start_gateway(MAX_CONCURRENT_REQUESTS=1, BATCH_MAX_IN_FLIGHT=5, MAX_QUEUE_SIZE=2, API_KEYS_FILE=str(keys))
    sdk = client(gateway.url, "sk-team")
    batch = submit(sdk, [chat_line(f"r{n}") for n in range(6)])
    assert wait_until(lambda: gateway.scheduler.waiting_room.in_queue == 4, timeout=10)  # one line runs, four wait
    headers = {"Authorization": "Bearer sk-team"}
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body("mine"), headers=headers, timeout=10)
    assert answer.status_code == 200  # neither the key's max_queued nor MAX_QUEUE_SIZE counted the lines
    assert float(answer.headers["x-queue-wait-ms"]) < 1000  # it waited for one slot, not behind four lines
    assert wait_status(sdk, batch.id).request_counts.completed == 6  # type: ignore[union-attr]


def test_a_large_upload_at_a_fair_rate_outlasts_body_timeout(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(BODY_TIMEOUT=1)
    boundary = "b0undary"
    line = jsonl([chat_line("after-the-padding")])
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()

    def body() -> Any:
        yield head
        for _ in range(12):  # 1.5 MiB over 2.4 s: past BODY_TIMEOUT, at 640 KiB/s
            time.sleep(0.2)
            yield b"\n" * (128 << 10)
        yield line + f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    answer = httpx.post(gateway.url + "/v1/files", content=body(), headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["bytes"] == 12 * (128 << 10) + len(line)
    sdk = client(gateway.url)
    batch = sdk.batches.create(
        input_file_id=answer.json()["id"], endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_status(sdk, batch.id)
    assert [line["custom_id"] for line in lines_of(sdk, done.output_file_id)] == ["after-the-padding"]


def test_a_batch_on_the_bundled_model(start_local: Callable[..., RunningGateway]) -> None:
    gateway = start_local(MAX_CONCURRENT_REQUESTS=2)
    sdk = client(gateway.url)
    lines = [chat_line(f"q{n}", "Name a color.", max_tokens=4, temperature=0) for n in range(3)]
    done = wait_status(sdk, submit(sdk, lines).id, timeout=60)
    assert done.status == "completed"
    output = lines_of(sdk, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2"]
    bodies = [line["response"]["body"] for line in output]
    assert all(body["usage"]["completion_tokens"] <= 4 and body["choices"][0]["message"]["content"] for body in bodies)
    assert len({body["choices"][0]["message"]["content"] for body in bodies}) == 1  # greedy: the same answer


def test_a_batch_of_embeddings(start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway()
    sdk = client(gateway.url)
    lines = [
        {"custom_id": f"e{n}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": f"text {n}"}}
        for n in range(3)
    ]
    file = upload(sdk, jsonl(lines))
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_status(sdk, batch.id)
    output = lines_of(sdk, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["e0", "e1", "e2"]
    assert all(line["response"]["body"]["object"] == "list" for line in output)
