"""A scripted stand-in for a vLLM OpenAI server, for injecting faults and reading what the
gateway sent. Never the proof that the product works: that is tests/e2e against real vLLM.

Run as a script it serves on `--port` (used as a fake engine for supervisor tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

TOKENS = ["Hello", ",", " world", "!"]


@dataclass
class Script:
    """What the stand-in does next, and what it saw."""

    mode: str = "ok"  # ok | reject | fail | garbage | die_mid_stream
    first_token_delay: float = 0.0  # before the first streamed token, or before a whole answer
    healthy: bool = True
    token_delay: float = 0.0
    tokens: list[str] = field(default_factory=lambda: list(TOKENS))
    bodies: list[dict[str, Any]] = field(default_factory=list)
    open_streams: int = 0
    aborted_streams: int = 0
    aborted_answers: int = 0  # non-streamed requests whose client left while they were computed
    models_answer: Any = None  # what /v1/models answers instead of a normal listing
    in_flight: int = 0  # requests being answered right now
    most_in_flight: int = 0


def completion(body: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    n = int(body.get("n", 1))
    prompt = body.get("prompt")
    prompt_len = len(prompt) if isinstance(prompt, list) else 1
    text = "".join(tokens[: body.get("max_tokens", len(tokens))])
    return {
        "id": "cmpl-standin",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": prompt_len,
            "completion_tokens": len(tokens) * n,
            "total_tokens": prompt_len + len(tokens) * n,
        },
    }


def build_app(script: Script) -> Starlette:
    async def health(_: Request) -> Response:
        return PlainTextResponse("", status_code=200 if script.healthy else 503)

    async def models(_: Request) -> Response:
        if script.models_answer is not None:
            return JSONResponse(script.models_answer)
        return JSONResponse({"object": "list", "data": [{"id": "any", "max_model_len": 2048}]})

    async def completions(request: Request) -> Response:
        script.in_flight += 1
        script.most_in_flight = max(script.most_in_flight, script.in_flight)
        try:
            return await answer(request)
        finally:
            script.in_flight -= 1

    async def answer(request: Request) -> Response:
        body = await request.json()
        script.bodies.append(body)
        if script.mode == "reject":
            error = {
                "message": "n must be 1 when using greedy sampling, got 2.",
                "type": "BadRequestError",
                "param": "n",
                "code": 400,
            }
            return JSONResponse({"error": error}, status_code=400)
        if script.mode == "fail":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if script.mode == "garbage":
            return PlainTextResponse("<html>not json</html>", status_code=200)
        if body.get("stream"):
            return StreamingResponse(stream(body), media_type="text/event-stream")
        waited = 0.0
        while waited < script.first_token_delay:
            if await request.is_disconnected():
                script.aborted_answers += 1
                return PlainTextResponse("", status_code=499)
            await asyncio.sleep(0.01)
            waited += 0.01
        return JSONResponse(completion(body, script.tokens))

    async def stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
        script.open_streams += 1
        finished = False
        try:
            if script.first_token_delay:
                await asyncio.sleep(script.first_token_delay)
            for position, token in enumerate(script.tokens):
                if script.mode == "die_mid_stream" and position == 2:
                    raise ConnectionResetError("stand-in dies mid-stream")
                last = position == len(script.tokens) - 1
                chunk = {
                    "id": "cmpl-standin",
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "text": token,
                            "logprobs": None,
                            "finish_reason": "length" if last else None,
                        }
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if script.token_delay:
                    await asyncio.sleep(script.token_delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = completion(body, script.tokens)["usage"]
                final = {"id": "cmpl-standin", "choices": [], "usage": usage}
                yield f"data: {json.dumps(final)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            script.open_streams -= 1
            if not finished and script.mode != "die_mid_stream":
                script.aborted_streams += 1

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def main() -> None:
    """Serve as a fake engine: accepts (and ignores) vLLM's command line, honours --port."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args()
    script = Script(
        healthy=os.environ.get("STANDIN_HEALTHY", "1") == "1",
        first_token_delay=float(os.environ.get("STANDIN_FIRST_TOKEN_DELAY", "0")),
        token_delay=float(os.environ.get("STANDIN_TOKEN_DELAY", "0")),
    )
    uvicorn.run(build_app(script), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
