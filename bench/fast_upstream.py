"""A stand-in OpenAI completions server that answers at once (and streams N tokens with no delay),
so a benchmark measures the gateway, not a model. Raw ASGI: as little of its own cost as possible."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

import uvicorn

from bench.asgi import read_body

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

ANSWER = json.dumps(
    {
        "id": "cmpl-fast",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
).encode()
TOKEN = b'data: {"id":"cmpl-fast","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}]}\n\n'
USAGE = b'data: {"id":"cmpl-fast","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\n'
MODELS = json.dumps({"object": "list", "data": [{"id": "m", "max_model_len": 4096}]}).encode()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await read_body(receive)
    path = scope["path"]
    if path == "/health":
        await _send(send, 200, b"", b"text/plain")
    elif path == "/v1/models":
        await _send(send, 200, MODELS, b"application/json")
    elif json.loads(body or b"{}").get("stream"):
        request = json.loads(body)
        tokens = int(request.get("max_tokens", 16))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for _ in range(tokens):
            await send({"type": "http.response.body", "body": TOKEN, "more_body": True})
        tail = (
            USAGE % (tokens, tokens + 8)
            if (request.get("stream_options") or {}).get("include_usage")
            else b""
        )
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})
    else:
        await _send(send, 200, ANSWER, b"application/json")


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
