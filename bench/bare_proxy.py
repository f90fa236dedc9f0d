"""The smallest FastAPI + aiohttp pass-through: no queue, auth, metrics or records. The stack's own limit.

UPSTREAM_BASE_URL=http://127.0.0.1:9100/v1 uvicorn bench.bare_proxy:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

UPSTREAM = os.environ.get("UPSTREAM_BASE_URL", "http://127.0.0.1:9100/v1")
HEADERS = {"Content-Type": "application/json"}
state: dict[str, aiohttp.ClientSession] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
    yield
    await state["session"].close()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    session = state["session"]
    if b'"stream":true' in body or b'"stream": true' in body:
        upstream = await session.post(UPSTREAM + "/chat/completions", data=body, headers=HEADERS)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        return StreamingResponse(relay(), media_type="text/event-stream")
    async with session.post(UPSTREAM + "/chat/completions", data=body, headers=HEADERS) as upstream:
        return Response(await upstream.read(), upstream.status, media_type="application/json")
