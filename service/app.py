"""`create_app(settings)`: the only way to build the gateway application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service import __version__
from service.errors import install_error_handlers
from service.gateway import Gateway
from service.pool import ModelPool, Worker, monitor_health
from service.routes import health, native, openai
from service.settings import Settings
from service.supervisor import WorkerProcess, build_embedded
from service.templates import load_tokenizers
from service.upstream import UpstreamClient, build_client

log = logging.getLogger(__name__)


def _pools(settings: Settings) -> tuple[dict[str, ModelPool], list[WorkerProcess]]:
    endpoints: dict[str, list[Worker]] = {}
    processes = build_embedded(settings, endpoints)
    for spec in settings.models:
        for url in spec.urls:
            endpoints.setdefault(spec.name, []).append(Worker(model=spec.name, url=str(url).rstrip("/")))
    pools = {spec.name: ModelPool(spec, endpoints.get(spec.name, [])) for spec in settings.models}
    return pools, processes


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    tokenizers = await asyncio.to_thread(load_tokenizers, settings)
    pools, processes = _pools(settings)
    client = build_client(settings)
    app.state.gateway = Gateway(settings, pools, tokenizers, UpstreamClient(client))
    app.state.processes = processes
    supervisors = [asyncio.create_task(process.supervise()) for process in processes]
    monitor = asyncio.create_task(monitor_health(client, list(pools.values()), settings.health_interval))
    try:
        yield
    finally:
        monitor.cancel()
        await asyncio.gather(*(process.stop() for process in processes), return_exceptions=True)
        await asyncio.gather(*supervisors, monitor, return_exceptions=True)
        await client.aclose()
        log.info("gateway stopped; %d worker process(es) terminated", len(processes))


def create_app(settings: Settings) -> FastAPI:
    """A gateway app for `settings`; its lifespan launches workers and owns every resource."""
    app = FastAPI(
        title="llm-gateway",
        version=__version__,
        summary="Base and instruct models behind one door, on vLLM workers.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    return app
