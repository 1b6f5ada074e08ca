"""A scripted stand-in for a vLLM OpenAI server, for injecting faults and reading what the
gateway sent. Never the proof that the product works: that is tests/e2e against real vLLM.

It answers /v1/completions, /v1/chat/completions and /v1/responses (streamed or not) with the
scripted tokens, in vLLM's shapes. It publishes an OpenAPI schema only when the script gives one.
It serves LoRA adapters as vLLM does with runtime loading on: `/v1/load_lora_adapter` (a folder without
`adapter_config.json` is a 404, a name it holds a 400), `/v1/unload_lora_adapter`, adapters listed in
`/v1/models` with a `parent`; with `served` set, a request naming neither a served name nor a loaded
adapter is vLLM's 404 (`forget_adapters()` is a worker restart, as far as adapters go).
Whole answers can be padded to a size (logprobs-like, with text that looks like a usage key, as
generated text may), sent without a Content-Length, or compressed as a compressing ingress would.

Run as a script it serves on `--port` (used as a fake engine for supervisor tests), with the ASGI
middleware named by `--middleware` loaded as vLLM loads it (the workers' guard).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import importlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
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

    mode: str = "ok"  # ok | reject | fail | garbage | broken_json | die_mid_stream
    first_token_delay: float = 0.0  # before the first streamed token, or before a whole answer
    healthy: bool = True
    token_delay: float = 0.0
    tokens: list[str] = field(default_factory=lambda: list(TOKENS))
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    traceparents: list[str | None] = field(default_factory=list)  # each request's `traceparent` header
    open_streams: int = 0
    aborted_streams: int = 0
    aborted_answers: int = 0  # non-streamed requests whose client left while they were computed
    models_answer: Any = None  # what /v1/models answers instead of a normal listing
    schema: dict[str, list[str]] | None = None  # request model -> fields, published as /openapi.json
    in_flight: int = 0  # requests being answered right now
    most_in_flight: int = 0
    answer_bytes: int = 0  # pad whole answers to about this size (a request's `standin_answer_bytes` too)
    chunked_answers: bool = False  # whole answers without a Content-Length
    compress: str = ""  # "allowed": gzip whole answers when the request accepts it; "always": anyway
    accept_encodings: list[str | None] = field(default_factory=list)  # each request's Accept-Encoding
    last_answer: bytes = b""  # the last whole answer's bytes, as sent
    health_hangs_while_busy: bool = False  # /health answers only once no request is being answered
    health_delay: float = 0.0  # seconds /health takes
    health_pending: int = 0  # /health requests being answered right now
    schema_failures: int = 0  # /openapi.json answers 500 this many more times before the schema
    max_model_len: int = 2048  # the context its /v1/models reports
    reject_echo: int = 0  # "reject": the message echoes a list this many items long (as vLLM does)
    # LoRA adapters (vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).
    served: set[str] | None = None  # names it serves besides its adapters; None: it answers any name
    adapters: dict[str, str] = field(default_factory=dict)  # loaded: name -> folder
    lora_runtime: bool = True  # whether the load routes exist
    load_delay: float = 0.0
    loads: list[str] = field(default_factory=list)  # every load asked, by name (answered or not)
    unloads: list[str] = field(default_factory=list)
    broken_adapters: set[str] = field(default_factory=set)  # load, then fail to generate
    # What its `/metrics` says the engine runs (`vllm:lora_requests_info`); None: no /metrics at all.
    lora_running: set[str] | None = None

    def forget_adapters(self) -> None:
        """What a restart does to the adapters it held."""
        self.adapters.clear()


def usage_of(body: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    n = int(body.get("n") or 1)
    prompt = body.get("prompt", body.get("messages"))
    prompt_len = len(prompt) if isinstance(prompt, list) else 1
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": len(tokens) * n,
        "total_tokens": prompt_len + len(tokens) * n,
    }


def completion(body: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    text = "".join(tokens[: body.get("max_tokens", len(tokens))])
    return {
        "id": "cmpl-standin",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            for i in range(int(body.get("n") or 1))
        ],
        "usage": usage_of(body, tokens),
    }


def chat_completion(body: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(tokens), "tool_calls": []}
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {"index": i, "message": message, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            for i in range(int(body.get("n") or 1))
        ],
        "usage": usage_of(body, tokens),
        "system_fingerprint": "standin",
    }


def batch_chat(body: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    answer = chat_completion(body, tokens)
    answer["choices"] = [{**answer["choices"][0], "index": i} for i in range(len(body.get("messages") or []))]
    return answer


# Logprobs-like padding for one token: a token whose text looks like a usage object, and a top-logprobs
# mapping with a `usage` key (as completions' top logprobs have tokens for keys).
PAD_TOKEN = json.dumps(
    {"token": '"usage":{"prompt_tokens":999}', "logprob": -0.25,
     "top_logprobs": {"usage": -0.5, '"usage": {"total_tokens": 7}': -1.5, " the": -2.25}}
).encode()  # fmt: skip
PAD_MARK = "__standin_padding__"


def whole_answer(answer: dict[str, Any], size: int) -> bytes:
    """The answer's bytes, its first choice's logprobs padded so that the whole is about `size`."""
    if size <= 0 or not answer.get("choices"):
        return json.dumps(answer).encode()
    answer["choices"][0]["logprobs"] = PAD_MARK
    raw = json.dumps(answer).encode()
    count = max(1, (size - len(raw)) // (len(PAD_TOKEN) + 1))
    padding = b'{"content":[' + b",".join([PAD_TOKEN] * count) + b"]}"
    return raw.replace(json.dumps(PAD_MARK).encode(), padding, 1)


def send_whole(script: Script, request: Request, raw: bytes) -> Response:
    """A whole answer as the script says: compressed or not, with a Content-Length or chunked."""
    script.last_answer = raw
    headers = {}
    accepted = request.headers.get("accept-encoding") or ""
    if script.compress == "always" or (script.compress == "allowed" and "gzip" in accepted):
        raw, headers = gzip.compress(raw, compresslevel=1), {"content-encoding": "gzip"}
    if not script.chunked_answers:
        return Response(raw, media_type="application/json", headers=headers)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 65536):
            yield raw[start : start + 65536]

    return StreamingResponse(pieces(), media_type="application/json", headers=headers)


def text_chunk(body: dict[str, Any], token: str, last: bool) -> dict[str, Any]:
    choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": "length" if last else None}
    return {"id": "cmpl-standin", "model": body.get("model"), "choices": [choice]}


def chat_chunk(body: dict[str, Any], token: str, last: bool) -> dict[str, Any]:
    choice = {
        "index": 0,
        "delta": {"content": token},
        "logprobs": None,
        "finish_reason": "length" if last else None,
    }
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "model": body.get("model"),
        "choices": [choice],
    }


def rejected(script: Script) -> Response:
    """vLLM's 400; with `reject_echo`, its message echoes the request's list as vLLM's does for
    `bad_words` (sent chunked when `chunked_answers`, without a Content-Length)."""
    message = "n must be 1 when using greedy sampling, got 2."
    if script.reject_echo:
        echoed = json.dumps([f"w{i}\u00e9q" for i in range(script.reject_echo)], ensure_ascii=False)
        message = f"Too many bad words after tokenization. (parameter=bad_words, value={echoed})"
    error = {"message": message, "type": "BadRequestError", "param": "n" if not script.reject_echo else
             "bad_words", "code": 400}  # fmt: skip
    raw = json.dumps({"error": error}).encode()
    if not script.chunked_answers:
        return Response(raw, status_code=400, media_type="application/json")

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 65536):
            yield raw[start : start + 65536]

    return StreamingResponse(pieces(), status_code=400, media_type="application/json")


def openapi(schema: dict[str, list[str]]) -> dict[str, Any]:
    components = {
        name: {"type": "object", "properties": {f: {} for f in fields}} for name, fields in schema.items()
    }
    return {"openapi": "3.1.0", "components": {"schemas": components}}


def build_app(script: Script) -> Starlette:
    async def health(_: Request) -> Response:
        script.health_pending += 1
        try:
            while script.health_hangs_while_busy and (script.in_flight or script.open_streams):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.sleep(script.health_delay)
        finally:
            script.health_pending -= 1
        return PlainTextResponse("", status_code=200 if script.healthy else 503)

    async def models(_: Request) -> Response:
        if script.models_answer is not None:
            return JSONResponse(script.models_answer)
        base = sorted(script.served)[0] if script.served else "any"
        entry = {"id": base, "max_model_len": script.max_model_len, "root": "/standin", "parent": None}
        loras = [{"id": name, "root": path, "parent": base} for name, path in script.adapters.items()]
        return JSONResponse({"object": "list", "data": [entry, *loras]})

    def vllm_error(message: str, kind: str, status: int) -> Response:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                            status_code=status)  # fmt: skip

    async def load_lora(request: Request) -> Response:
        if not script.lora_runtime:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        script.loads.append(name)
        await asyncio.sleep(script.load_delay)
        if name in script.adapters:
            return vllm_error(
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                "InvalidUserInput",
                400,
            )
        if not await asyncio.to_thread(os.path.isfile, os.path.join(path, "adapter_config.json")):
            message = f"Loading lora {name} failed: No adapter found for {path}"
            return vllm_error(message, "NotFoundError", 404)
        script.adapters[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(request: Request) -> Response:
        name = (await request.json()).get("lora_name")
        script.unloads.append(name)
        if script.adapters.pop(name, None) is None:
            return vllm_error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(_: Request) -> Response:
        if script.lora_running is None:
            return PlainTextResponse("Not Found", status_code=404)
        running = ",".join(sorted(script.lora_running))
        return PlainTextResponse(
            "# TYPE vllm:lora_requests_info gauge\n"
            f'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="{running}",'
            f'waiting_lora_adapters=""}} {time.time()}\n'
        )

    def unknown_model(body: dict[str, Any]) -> Response | None:
        """vLLM's answer to a model name it does not serve (None: it serves it)."""
        name = body.get("model")
        if script.served is None or name in script.served or name in script.adapters:
            return None
        valid = ", ".join(sorted(script.served))
        return vllm_error(f"The model `{name}` does not exist. Valid aliases: {valid}.", "NotFoundError", 404)

    async def openapi_json(_: Request) -> Response:
        if script.schema is None:
            return PlainTextResponse("Not Found", status_code=404)
        if script.schema_failures > 0:
            script.schema_failures -= 1
            return PlainTextResponse("Internal Server Error", status_code=500)
        return JSONResponse(openapi(script.schema))

    def endpoint(whole: Callable[[dict[str, Any], list[str]], dict[str, Any]], chunk: Any) -> Any:
        async def serve(request: Request) -> Response:
            script.in_flight += 1
            script.most_in_flight = max(script.most_in_flight, script.in_flight)
            try:
                return await answer(request, whole, chunk)
            finally:
                script.in_flight -= 1

        return serve

    async def answer(request: Request, whole: Any, chunk: Any) -> Response:
        body = await request.json()
        script.bodies.append(body)
        script.paths.append(request.url.path)
        script.traceparents.append(request.headers.get("traceparent"))
        script.accept_encodings.append(request.headers.get("accept-encoding"))
        if (refused := unknown_model(body)) is not None:
            return refused
        if body.get("model") in script.broken_adapters:
            return PlainTextResponse("Internal Server Error", status_code=500)
        if script.mode == "reject":
            return rejected(script)
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n < 1:  # vLLM refuses it (the gateway lets it)
            message = f"n must be at least 1, got {n}."
            error = {"message": message, "type": "BadRequestError", "param": "n", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        if script.mode == "fail":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if script.mode == "garbage":
            return PlainTextResponse("<html>not json</html>", status_code=200)
        if script.mode == "broken_json":
            return PlainTextResponse('{"id": "cmpl-standin", "choices": [}', media_type="application/json")
        if body.get("stream") and chunk is not None:  # vLLM's batch route (no chunks) answers whole
            return StreamingResponse(stream(body, chunk), media_type="text/event-stream")
        waited = 0.0
        while waited < script.first_token_delay:
            if await request.is_disconnected():
                script.aborted_answers += 1
                return PlainTextResponse("", status_code=499)
            await asyncio.sleep(0.01)
            waited += 0.01
        size = int(body.get("standin_answer_bytes") or script.answer_bytes)
        return send_whole(script, request, whole_answer(whole(body, script.tokens), size))

    async def stream(body: dict[str, Any], chunk: Any) -> AsyncIterator[bytes]:
        script.open_streams += 1
        finished = False
        try:
            if script.first_token_delay:
                await asyncio.sleep(script.first_token_delay)
            for position, token in enumerate(script.tokens):
                if script.mode == "die_mid_stream" and position == 2:
                    raise ConnectionResetError("stand-in dies mid-stream")
                event = chunk(body, token, position == len(script.tokens) - 1)
                yield f"data: {json.dumps(event)}\n\n".encode()
                if script.token_delay:
                    await asyncio.sleep(script.token_delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                final = {"id": "cmpl-standin", "choices": [], "usage": usage_of(body, script.tokens)}
                yield f"data: {json.dumps(final)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            script.open_streams -= 1
            if not finished and script.mode != "die_mid_stream":
                script.aborted_streams += 1

    async def responses(request: Request) -> Response:
        body = await request.json()
        script.bodies.append(body)
        script.paths.append(request.url.path)
        script.traceparents.append(request.headers.get("traceparent"))
        if (refused := unknown_model(body)) is not None:
            return refused
        text = "".join(script.tokens)
        usage = {
            "input_tokens": 3,
            "output_tokens": len(script.tokens),
            "total_tokens": 3 + len(script.tokens),
        }
        output = [{"type": "message", "content": [{"type": "output_text", "text": text}]}]
        done = {"id": "resp-standin", "object": "response", "status": "completed", "output": output}
        done["usage"] = usage
        if not body.get("stream"):
            return JSONResponse(done)

        async def events() -> AsyncIterator[bytes]:
            created = {
                "type": "response.created",
                "response": {**done, "status": "in_progress", "usage": None},
            }
            yield f"event: response.created\ndata: {json.dumps(created)}\n\n".encode()
            for token in script.tokens:
                delta = {"type": "response.output_text.delta", "delta": token}
                yield f"event: response.output_text.delta\ndata: {json.dumps(delta)}\n\n".encode()
            completed = {"type": "response.completed", "response": done}
            yield f"event: response.completed\ndata: {json.dumps(completed)}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/openapi.json", openapi_json),
            Route("/v1/completions", endpoint(completion, text_chunk), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(chat_completion, chat_chunk), methods=["POST"]),
            Route("/v1/chat/completions/batch", endpoint(batch_chat, None), methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
            Route("/metrics", metrics),
        ]
    )


def main() -> None:
    """Serve as a fake engine: accepts (and ignores) vLLM's command line, honours --port."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--middleware", action="append", default=[])  # loaded as vLLM's server does
    args, _ = parser.parse_known_args()
    script = Script(
        healthy=os.environ.get("STANDIN_HEALTHY", "1") == "1",
        first_token_delay=float(os.environ.get("STANDIN_FIRST_TOKEN_DELAY", "0")),
        token_delay=float(os.environ.get("STANDIN_TOKEN_DELAY", "0")),
        health_hangs_while_busy=os.environ.get("STANDIN_HEALTH_HANGS_WHILE_BUSY", "0") == "1",
    )
    app = build_app(script)
    for middleware in args.middleware:  # vllm/entrypoints/serve/middleware/register.py, for a class
        module, name = middleware.rsplit(".", 1)
        app.add_middleware(getattr(importlib.import_module(module), name))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
