"""`create_app(settings)`: the only way to build the gateway application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.discovery import discover, keep_discovering
from service.drain import Drain, DrainMiddleware
from service.errors import install_error_handlers
from service.fastroutes import DirectRoutes
from service.gateway import Gateway
from service.guards import OPEN_PATHS, ApiKeyMiddleware, BodyLimitMiddleware
from service.metrics import Metrics
from service.observe import ObservabilityMiddleware
from service.openapi import install_openapi
from service.pool import Capacity, ModelPool, Worker, monitor_health
from service.routes import health, native, openai, playground
from service.settings import Settings
from service.supervisor import WorkerProcess, build_embedded
from service.templates import load_tokenizers
from service.upstream import UpstreamClient, build_session

log = logging.getLogger(__name__)


def _pools(settings: Settings) -> tuple[dict[str, ModelPool], list[WorkerProcess]]:
    endpoints: dict[str, list[Worker]] = {}
    processes = build_embedded(settings, endpoints)
    capacity = Capacity(
        settings.max_in_flight_per_worker, settings.max_queue_per_model, settings.queue_timeout
    )
    pools = {spec.name: ModelPool(spec, endpoints.get(spec.name, []), capacity) for spec in settings.models}
    return pools, processes


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    pools, processes = _pools(settings)
    # Workers take a minute or more to load; launch them first and read tokenizers meanwhile.
    supervisors = [asyncio.create_task(process.supervise()) for process in processes]
    session = build_session(settings)
    monitor = discovery = None
    try:
        tokenizers = await asyncio.to_thread(load_tokenizers, settings)
        await discover(list(pools.values()))
        app.state.gateway = Gateway(
            settings, pools, tokenizers, UpstreamClient(session), app.state.metrics, app.state.drain
        )
        app.state.processes = processes
        monitor = asyncio.create_task(
            monitor_health(session, list(pools.values()), settings.health_interval, settings.health_timeout)
        )
        discovery = asyncio.create_task(keep_discovering(list(pools.values()), settings.discovery_interval))
        yield
    finally:
        background = [task for task in (monitor, discovery) if task is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*(process.stop() for process in processes), return_exceptions=True)
        await asyncio.gather(*supervisors, *background, return_exceptions=True)
        await session.close()
        log.info("gateway stopped; %d worker process(es) terminated", len(processes))


def _served_pools(app: FastAPI) -> list[ModelPool]:
    gateway: Gateway | None = getattr(app.state, "gateway", None)
    return list(gateway.pools.values()) if gateway else []


def create_app(settings: Settings) -> FastAPI:
    """A gateway app for `settings`; its lifespan launches workers and owns every resource."""
    app = FastAPI(
        title="llm-gateway",
        version=__version__,
        summary="Base and instruct models behind one door, on vLLM workers.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(lambda: _served_pools(app))
    app.state.drain = Drain(settings.drain_timeout)
    # Added innermost first: observability wraps everything, so rejected requests are counted too.
    app.add_middleware(DirectRoutes, api=app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_keys:
        open_paths = OPEN_PATHS if settings.metrics_require_key else OPEN_PATHS | {"/metrics"}
        keys = [key.get_secret_value() for key in settings.api_keys]
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths, rate_limit=settings.rate_limit)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id"],
        )
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=playground.STATIC_DIR), name="static")
    return app
