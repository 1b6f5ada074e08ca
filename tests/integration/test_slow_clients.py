"""Slow and greedy clients against the gateway served with its real uvicorn configuration: a
client that trickles its headers (slowloris), never sends any, sends a huge head, sends its body
slowly, or opens too many connections is refused and disconnected, while others are served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn

from service.api.app import create_app
from service.api.server import server_config
from service.ops.settings import Settings
from service.workers.supervisor import free_port
from tests.integration.conftest import standin_settings

LIMITS = {"header_timeout": 0.5, "max_header_bytes": 4096, "max_connections": 16, "body_timeout": 0.5}


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    settings = settings.model_copy(update={"port": free_port("127.0.0.1")})
    app = create_app(settings)
    server = uvicorn.Server(server_config(app, settings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{settings.port}", settings.port
    finally:
        server.should_exit = True
        await task


async def read_response(
    reader: asyncio.StreamReader, seconds: float = 5
) -> tuple[int, dict[str, Any], float]:
    """Status, JSON body and when the server closed the connection (seconds from now)."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout=seconds)  # until the server closes
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), time.monotonic() - started


async def test_a_client_that_trickles_its_headers_is_cut_off(standin_url: str) -> None:
    async with served(standin_settings(standin_url, **LIMITS)) as (url, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /complete HTTP/1.1\r\nHost: gateway\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for index in range(50):
                    writer.write(b"X-Slow-%d: a\r\n" % index)
                    await writer.drain()
                    await asyncio.sleep(0.1)

        trickling = asyncio.ensure_future(trickle())
        status, body, _ = await read_response(reader)
        trickling.cancel()
        writer.close()
        assert status == 408
        assert body["error"]["code"] == "header_timeout"
        assert time.monotonic() - started < 2.0
        # Others are served meanwhile and after.
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.post("/complete", json={"model": "base", "prompt": "x"})).status_code == 200


async def test_a_client_that_connects_and_sends_nothing_is_closed(standin_url: str) -> None:
    async with served(standin_settings(standin_url, **LIMITS)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, _, waited = await read_response(reader)
        writer.close()
        assert status == 408 and waited < 2.0


async def test_an_oversized_head_is_a_431(standin_url: str) -> None:
    async with (
        served(standin_settings(standin_url, **LIMITS)) as (url, _),
        httpx.AsyncClient(base_url=url) as http,
    ):
        headers = {f"x-filler-{i}": "y" * 200 for i in range(40)}  # ~9 KB of headers
        response = await http.get("/health", headers=headers)
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "headers_too_large"
        assert (await http.get("/health")).status_code == 200


async def test_a_body_that_arrives_too_slowly_is_a_408(standin_url: str) -> None:
    async with served(standin_settings(standin_url, **LIMITS)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /complete HTTP/1.1\r\nHost: g\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"prompt": "'
        )
        await writer.drain()
        status, body, waited = await read_response(reader)
        writer.close()
        assert status == 408
        assert body["error"]["code"] == "body_timeout"
        assert waited < 2.0


async def test_connections_over_the_cap_are_refused_with_a_503(standin_url: str) -> None:
    limits = {**LIMITS, "header_timeout": 30.0}
    async with served(standin_settings(standin_url, **limits)) as (url, port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body, _ = await read_response(reader)
        writer.close()
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        for _, idle_writer in idle:
            idle_writer.close()
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/health")).status_code == 200
