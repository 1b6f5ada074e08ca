"""The floor for a Python gateway on this stack: a raw ASGI app under uvicorn (uvloop, httptools)
that forwards each request body to the upstream with one pooled aiohttp session and relays the answer
(streams as they arrive), with nothing else: no validation, tokenizing, metrics, logs or limits.
`python -m bench.overhead --floor` measures it next to the gateway, so the gateway's own cost is
the difference between the two."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import aiohttp
import uvicorn

from bench.asgi import read_body

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

UPSTREAM = ""
session: aiohttp.ClientSession | None = None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global session
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=0)
                session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
        assert session is not None
        await session.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await read_body(receive)
    assert session is not None
    headers = {"Content-Type": "application/json"}
    async with session.post(UPSTREAM + scope["path"], data=body, headers=headers) as response:
        content_type = response.headers.get("Content-Type", "application/json").encode()
        start = {"type": "http.response.start", "status": response.status}
        if content_type.startswith(b"text/event-stream"):
            await send({**start, "headers": [(b"content-type", content_type)]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        data = await response.read()
    headers_out = [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]
    await send({**start, "headers": headers_out})
    await send({"type": "http.response.body", "body": data})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    UPSTREAM = args.upstream
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
        loop="uvloop", http="httptools",
    )  # fmt: skip
