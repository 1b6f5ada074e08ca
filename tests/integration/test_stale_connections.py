"""A worker closes idle connections (vLLM's server after 5 s); a request sent on a pooled
connection the worker has just closed must not fail. The gateway keeps idle connections for less
time than the worker, and retries a request whose connection was found closed before any answer,
on the same replica when it is the only one."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from service.ops.settings import Settings
from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import completion


@contextlib.asynccontextmanager
async def closing_worker() -> AsyncIterator[tuple[str, list[str]]]:
    """A minimal HTTP worker that answers GETs normally and the first POST of each connection,
    but closes a connection without answering when a second POST arrives on it: exactly what a
    client sees when it reuses a connection the server was closing."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        posts = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].decode()
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")), 0,
                )  # fmt: skip
                body = await reader.readexactly(length) if length else b""
                if method == "POST":
                    posts += 1
                    seen.append("closed" if posts > 1 else "answered")
                    if posts > 1:
                        break  # the idle-timeout close racing the request
                    payload = json.dumps(completion(json.loads(body), ["ok"])).encode()
                elif b"/v1/models" in head:
                    payload = json.dumps({"data": [{"id": "m", "max_model_len": 2048}]}).encode()
                else:
                    payload = b"{}"
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_request_on_a_connection_the_worker_closed_is_retried_on_the_same_replica() -> None:
    async with closing_worker() as (url, seen):
        # One replica, and an idle keep-alive long enough that the connection is always reused.
        settings = standin_settings(url, upstream_keep_alive=30, health_interval=60)
        async with running_gateway(settings) as (_, http):
            for _ in range(3):
                response = await http.post("/complete", json={"model": "base", "prompt": "x"})
                assert response.status_code == 200, response.text
        assert seen.count("closed") >= 2  # the reused connections were closed under the gateway


def test_idle_worker_connections_are_dropped_before_vllm_drops_them() -> None:
    assert Settings().upstream_keep_alive < 5.0  # vLLM's (uvicorn's) idle timeout
