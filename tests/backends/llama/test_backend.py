"""LlamaBackend on the bundled model, without HTTP: what the engine holds when a stream is abandoned."""

from __future__ import annotations

import asyncio

import orjson

from app.backends.base import BackendStream
from app.backends.llama import LlamaBackend
from app.schemas import parse_completion_request

NO_DEADLINE = float("inf")


async def open_stream(backend: LlamaBackend, max_tokens: int) -> BackendStream:
    body = orjson.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "temperature": 0})
    prepared = await backend.prepare(parse_completion_request(body, "completion"))
    return await backend.stream(prepared, NO_DEADLINE)


def test_a_stream_closed_before_its_first_event_costs_the_engine_nothing() -> None:
    async def scenario() -> tuple[int, int, int]:
        backend = LlamaBackend(
            model_path=None, alias=None, n_ctx=512, n_seq=1, n_threads=None, n_gpu_layers=0, chat_template=None
        )
        await backend.start()
        try:
            # As when the client is gone before the response headers could be sent.
            unstarted = await open_stream(backend, 400)
            await unstarted.aclose()
            await asyncio.sleep(0.2)
            idle = len(backend._engine.slots.active) + len(backend._engine._waiting)
            # Left after its first event: the sequence is cancelled and the only slot is free again.
            started = await open_stream(backend, 400)
            await anext(aiter(started))
            await started.aclose()
            await asyncio.sleep(0.2)
            after_leaving = len(backend._engine.slots.active) + len(backend._engine._waiting)
            follow_up = await open_stream(backend, 3)
            chunks = [chunk async for chunk in follow_up]
            return idle, after_leaving, len(chunks)
        finally:
            await backend.aclose()

    idle, after_leaving, chunks = asyncio.run(scenario())
    assert idle == 0
    assert after_leaving == 0
    assert chunks >= 2  # the one slot served the next request to its end ([DONE] included)
