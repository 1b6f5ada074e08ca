"""The real gateway app (uvicorn, in-process, lifespan on) in front of a scripted stand-in worker."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.endpoint import Endpoint
from service.api.endpoints import ENDPOINTS
from service.core.gateway import Gateway
from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.pool import ModelPool
from service.workers.supervisor import free_port
from tests.integration.standin import Script, build_app

# SmolLM2's small tokenizer for both models keeps start-up quick; the stand-in ignores token ids.
TOKENIZER = "builtin:smollm2-135m-instruct"
# The tests' own store: never the user's (~/.cache/llm-gateway/gateway.db, which other checkouts migrate).
TEST_STORE = Path(tempfile.mkdtemp(prefix="gateway-tests-")) / "gateway.db"


@contextlib.asynccontextmanager
async def serve_in_background(app: object) -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port until the block ends."""
    port = free_port("127.0.0.1")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )  # type: ignore[arg-type]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="session")
def script() -> Script:
    return Script()


@pytest.fixture(autouse=True)
def fresh_script(script: Script) -> None:
    """Every test starts from a well-behaved stand-in with an empty record."""
    fresh = Script()
    for name in fresh.__dataclass_fields__:
        setattr(script, name, getattr(fresh, name))


@pytest.fixture(scope="session")
async def standin_url(script: Script) -> AsyncIterator[str]:
    async with serve_in_background(build_app(script)) as url:
        yield url


def standin_settings(*urls: str, **overrides: Any) -> Settings:
    """Two models in external mode, both answered by the stand-in(s)."""
    return Settings(
        models=[
            ModelSpec(name="base", kind=ModelKind.BASE, tokenizer=TOKENIZER, urls=list(urls)),
            ModelSpec(name="chat", kind=ModelKind.INSTRUCT, tokenizer=TOKENIZER, urls=list(urls)),
        ],
        **{
            "health_interval": 0.1,
            "default_max_tokens": 100,
            "database_url": f"sqlite:///{TEST_STORE}",
            **overrides,
        },
    )


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, endpoints: Sequence[Endpoint] = ENDPOINTS
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A gateway app with `settings` (and an endpoint table), served, and a client of it once every model
    is ready."""
    app = create_app(settings, endpoints)
    async with serve_in_background(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(200):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield app, client


# The shared gateway's operator key (its store is a database of its own, never the cache folder's).
ADMIN_KEY = "admin-key-of-the-tests"


@pytest.fixture(scope="session")
async def gateway_app(standin_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    database = tmp_path_factory.mktemp("store") / "gateway.db"
    app = create_app(
        standin_settings(standin_url, admin_keys=ADMIN_KEY, database_url=f"sqlite:///{database}")
    )
    async with serve_in_background(app) as url:
        app.state.url = url
        yield app


@pytest.fixture
def gateway(gateway_app: FastAPI) -> Gateway:
    """The running app's shared state (pools, outstanding counts)."""
    state: Gateway = gateway_app.state.gateway
    return state


@pytest.fixture
async def http(gateway_app: FastAPI, script: Script) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway, once the stand-in is seen healthy."""
    async with httpx.AsyncClient(base_url=gateway_app.state.url, timeout=10) as client:
        for _ in range(100):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield client


@contextlib.contextmanager
def first_replica_first(pool: ModelPool) -> Iterator[None]:
    """Both replicas taken as up (as if the last health check saw them) and, for the block, the first
    one picked first: the second carries pretend load (beyond any routing bound)."""
    for worker in pool.workers:
        worker.mark(True)
    pool.workers[1].outstanding = 5
    try:
        yield
    finally:
        pool.workers[1].outstanding = 0


@contextlib.asynccontextmanager
async def extra_standin() -> AsyncIterator[tuple[Script, str]]:
    """Another stand-in worker with its own script (for multi-replica tests)."""
    script = Script()
    async with serve_in_background(build_app(script)) as url:
        yield script, url


@contextlib.contextmanager
def serve_in_thread(app: object) -> Iterator[str]:
    """Serve an ASGI app from its own thread and loop (for synchronous tests)."""
    port = free_port("127.0.0.1")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "server thread died"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
