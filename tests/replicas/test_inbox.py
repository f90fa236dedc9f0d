"""The inbox's messages handed on, on plain strings: grants, questions (a key's name may hold a bar), and
what is of no known kind."""

from __future__ import annotations

import asyncio

import pytest

from app.replicas.inbox import Inbox


def _inbox(got: list[tuple[str, ...]]) -> Inbox:
    return Inbox(
        None,  # handle() never reads Redis
        "p:in:r1",
        asyncio.Event(),
        lambda ticket, member: got.append(("grant", ticket, member)),
        lambda verb, reply, key, request_id: got.append((verb, reply, key, request_id)),
        lambda error: got.append(("lost", str(error))),
    )


def test_grants_and_questions_are_handed_on_and_others_dropped(caplog: pytest.LogCaptureFixture) -> None:
    got: list[tuple[str, ...]] = []
    inbox = _inbox(got)
    inbox.handle("g|7|r2|vllm-a")  # a ticket holds bars: the member is after the last
    inbox.handle("q|p:ans:1|team|a|req-1")  # the key "team|a"
    inbox.handle("c|p:ans:2||req-2")  # authentication off: no key
    inbox.handle("x|what")
    assert got == [
        ("grant", "7|r2", "vllm-a"),
        ("q", "p:ans:1", "team|a", "req-1"),
        ("c", "p:ans:2", "", "req-2"),
    ]
    assert "no known kind" in caplog.text
