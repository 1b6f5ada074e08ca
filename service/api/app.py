"""`create_app(settings)`: the only way to build the gateway application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from service import __version__
from service.api.admin_auth import AdminGuard
from service.api.auth import ApiKeyMiddleware, FailedKeyLimit
from service.api.body_limit import BodyLimitMiddleware
from service.api.dispatch import Dispatcher
from service.api.docs_pages import DOCS_PATHS, install_docs
from service.api.drain import Drain, DrainMiddleware
from service.api.endpoint import (
    Endpoint,
    admin_paths,
    metric_labels,
    open_paths,
    post_endpoints,
    shared_paths,
    undrained_paths,
)
from service.api.endpoints import ENDPOINTS
from service.api.errors import install_error_handlers
from service.api.handlers.playground import STATIC_DIR
from service.api.observability import ObservabilityMiddleware
from service.api.openapi import install_openapi
from service.core.adapters import AdapterRegistry
from service.core.gateway import Gateway
from service.core.templates import load_tokenizers
from service.core.tenancy import Tenancy
from service.core.tenants import Tenants
from service.ops.host_counters import HostCounters, counters_for
from service.ops.metrics import Metrics
from service.ops.settings import ModelSpec, Settings
from service.ops.tracing import tracing_from_env
from service.store.database import Database, default_url
from service.workers.contract import read_contract
from service.workers.discovery import discover, keep_discovering
from service.workers.facts import read_model_entry
from service.workers.health import build_monitor
from service.workers.http_transport import HttpTransport, build_session
from service.workers.pool import Capacity, ModelPool, Worker
from service.workers.roster import follow_roster, keep_following
from service.workers.routing import Router, RoutingConfig
from service.workers.supervisor import WorkerProcess, build_embedded

log = logging.getLogger(__name__)


def build_pools(
    settings: Settings, counters: HostCounters | None = None
) -> tuple[dict[str, ModelPool], list[WorkerProcess]]:
    """A pool per served model, and a supervised process per embedded worker to launch (none when
    another process launches them and publishes the roster this one follows); slots are counted in
    `counters` (the host's, shared with the other processes)."""
    endpoints: dict[str, list[Worker]] = {}
    processes = build_embedded(settings, endpoints) if settings.roster_file is None else []
    capacity = Capacity(
        settings.max_in_flight_per_worker,
        settings.max_queue_per_model,
        settings.queue_timeout,
        queue_share=settings.queue_share_per_key,
    )
    slots = counters or HostCounters.in_memory()
    pools = {
        spec.name: ModelPool(
            spec, endpoints.get(spec.name, []), capacity, Router(routing_config(settings, spec)), slots
        )
        for spec in settings.models
    }
    return pools, processes


def routing_config(settings: Settings, spec: ModelSpec) -> RoutingConfig:
    """A model's routing: its own policy, else the default, with the shared tuning."""
    return RoutingConfig(
        policy=spec.routing or settings.routing,
        max_prefix_tokens=settings.routing_max_prefix_tokens,
        balance_factor=settings.routing_balance_factor,
        index_blocks=settings.routing_index_blocks,
        adapter_affinity=spec.adapter_affinity,
    )


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    pools, processes = build_pools(settings, app.state.counters)
    # Workers take a minute or more to load; launch them first and read tokenizers meanwhile.
    supervisors = [asyncio.create_task(process.supervise()) for process in processes]
    session = build_session(settings)
    # Probes get their own connections: a probe never waits behind traffic, nor reuses its sockets.
    probes = build_session(settings)
    monitor = discovery = roster = tenants = None
    registry: AdapterRegistry | None = None
    try:
        # Migrating takes a lock, so processes and pods starting together migrate once.
        await asyncio.to_thread(app.state.database.migrate)
        await app.state.tenants.start()  # the keys managed at runtime, known before serving
        tenants = app.state.tenants
        tokenizers = await asyncio.to_thread(load_tokenizers, settings)
        await discover(list(pools.values()))
        app.state.gateway = Gateway(
            settings,
            pools,
            tokenizers,
            HttpTransport(session, settings),
            app.state.metrics,
            app.state.drain.streams,
            app.state.tracing,
            tenants=app.state.tenants,
        )
        app.state.processes = processes
        # Adapters: the configured ones, and those registered (in the store), followed from now on.
        registry = AdapterRegistry(app.state.gateway, app.state.database)
        await registry.start()
        app.state.gateway.registry = registry
        health = build_monitor(settings, probes, list(pools.values()), (read_model_entry, read_contract))
        if settings.roster_file is not None:  # another process launches the workers: follow it
            seen = follow_roster(list(pools.values()), settings.roster_file)
            roster = asyncio.create_task(keep_following(list(pools.values()), settings.roster_file, seen))
        # One round of checks before serving: a gateway process that joins others on a port takes
        # requests only once it knows which workers answer.
        await health.check_all()
        monitor = asyncio.create_task(health.run())
        discovery = asyncio.create_task(keep_discovering(list(pools.values()), settings.discovery_interval))
        yield
    finally:
        background = [task for task in (monitor, discovery, roster) if task is not None]
        for task in background:
            task.cancel()
        if registry is not None:
            await registry.stop()
        await asyncio.gather(*(process.stop() for process in processes), return_exceptions=True)
        await asyncio.gather(*supervisors, *background, return_exceptions=True)
        await session.close()
        await probes.close()
        if tenants is not None:
            await tenants.stop()  # usage written, allowances given back (the drain is over)
        await asyncio.to_thread(app.state.database.close)
        if app.state.tracing is not None:
            await asyncio.to_thread(app.state.tracing.shutdown)  # sends what is buffered
        log.info("gateway stopped; %d worker process(es) terminated", len(processes))


def database_url(settings: Settings) -> str:
    """The configured database, else SQLite in the cache folder."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return default_url(settings.cache_dir)


def _served_pools(app: FastAPI) -> list[ModelPool]:
    gateway: Gateway | None = getattr(app.state, "gateway", None)
    return list(gateway.pools.values()) if gateway else []


class GatewayApp(FastAPI):
    """FastAPI with the gateway's own pure-ASGI layers (`edge_middleware`, outermost first) outside
    FastAPI's stack rather than inside it: requests for the endpoint table are answered by the
    dispatcher before Starlette's error middleware; everything else (GET routes, docs, static files)
    goes on to FastAPI as usual. (`build_middleware_stack` is Starlette's hook for this.)"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.edge_middleware: list[Middleware] = []

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for middleware in reversed(self.edge_middleware):
            app = middleware.cls(app, *middleware.args, **middleware.kwargs)
        return app


def create_app(settings: Settings, endpoints: Sequence[Endpoint] = ENDPOINTS) -> GatewayApp:
    """A gateway app for `settings`; its lifespan launches workers and owns every resource."""
    app = GatewayApp(
        title="llm-gateway",
        version=__version__,
        summary="Base and instruct models behind one door, on vLLM workers.",
        lifespan=_lifespan,
        docs_url=None,  # served by install_docs, without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    # While keys are set, metrics readable without one must not show where the workers are.
    hide = settings.metrics_public
    app.state.metrics = Metrics(
        lambda: [row for pool in _served_pools(app) for row in pool.health_rows(hide)]
    )
    app.state.drain = Drain(settings.drain_timeout, settings.drain_accept_window)
    app.state.counters = counters_for(settings)  # limits' counters, shared by the host's processes
    app.state.database = Database(database_url(settings))  # state that outlives a process
    # Keys managed at runtime (followed from the store), their limits and usage.
    app.state.tenants = Tenants(settings, app.state.database, app.state.metrics.registry)
    # Who each API key is, and its cache salt.
    app.state.tenancy = Tenancy.from_settings(settings, app.state.tenants.directory)
    app.state.tracing = tracing_from_env(__version__)  # None unless OTEL_EXPORTER_OTLP_* is set
    # Outermost first: observability wraps everything, so refused requests are counted too.
    edge = [
        Middleware(
            ObservabilityMiddleware,
            metrics=app.state.metrics,
            labels=metric_labels(endpoints),
            shared=shared_paths(endpoints),
            tracing=app.state.tracing,
        ),
        Middleware(DrainMiddleware, drain=app.state.drain, exempt=undrained_paths(endpoints)),
    ]
    if settings.cors_allow_origins:
        edge.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_allow_origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "X-Request-Id",
                    settings.routing_session_header,
                    "traceparent",
                    "tracestate",
                ],
                expose_headers=["X-Request-Id", "Server-Timing"],
            )
        )
    failed = FailedKeyLimit(
        settings.auth_failure_limit, settings.auth_failure_window, settings.trusted_proxies
    )
    # Metrics are host-wide (every tenant's counts): with admin keys, they are the operator's to read.
    operator = admin_paths(endpoints, also=["/metrics"] if settings.metrics_need_admin_key else [])
    if operator:  # the operator's routes take admin keys only (and are off without them)
        admin_keys = [key.get_secret_value() for key in settings.admin_keys]
        edge.append(Middleware(AdminGuard, keys=admin_keys, paths=operator, failed_keys=failed,
                               counters=app.state.counters))  # fmt: skip
    # Always there: keys may be created at runtime (it lets everything through while there are none).
    exempt = open_paths(endpoints) | DOCS_PATHS | ({"/metrics"} if not settings.metrics_need_key else set())
    keys = [key.get_secret_value() for key in settings.api_keys]
    edge.append(
        Middleware(ApiKeyMiddleware, keys=keys, open_paths=exempt, rate_limit=settings.rate_limit,
                   failed_keys=failed, counters=app.state.counters, metrics=app.state.metrics,
                   operator_paths=operator, tenants=app.state.tenants,
                   admin_keys=[key.get_secret_value() for key in settings.admin_keys])
    )  # fmt: skip
    edge.append(Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes))
    dispatch = Middleware(
        Dispatcher,
        endpoints=post_endpoints(endpoints),
        state=app.state,
        session_header=settings.routing_session_header,
        max_json_containers=settings.max_json_containers,
        other_methods=shared_paths(endpoints),
    )
    edge.append(dispatch)
    app.edge_middleware = edge
    install_error_handlers(app)
    for endpoint in endpoints:
        if endpoint.method in ("GET", "DELETE") and endpoint.handler is not None:
            documented = endpoint.tag != "playground"
            app.add_api_route(endpoint.path, endpoint.handler, methods=[endpoint.method],
                              summary=endpoint.summary, tags=[endpoint.tag],
                              include_in_schema=documented)  # fmt: skip
    install_openapi(app, endpoints)
    install_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
