"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response

from service import __version__
from service.api.deps import GatewayDep
from service.core.served import ServedModel
from service.ops.metrics import CONTENT_TYPE, Metrics
from service.workers.worker import address_of


async def health() -> dict[str, str]:
    """200 while the process serves, with the gateway's version (GET /version is the workers' vLLM's)."""
    return {"status": "ok", "version": __version__}


AnyModel = Annotated[
    str | None,
    Query(
        alias="any",
        description="Present (`/ready?any`): 200 while the gateway can serve at least one model, for load "
        "balancers and readiness probes (one model without a healthy worker then takes no gateway out).",
    ),
]


async def ready(gateway: GatewayDep, request: Request, any_model: AnyModel = None) -> JSONResponse:
    """200 when every model has a healthy worker (with `?any`: some model); else 503 naming the models
    that have none, and in `detail` each worker that is down and why. Draining: 503 at once."""
    models = {pool.name: pool.ready for pool in gateway.pools.values()}
    waiting = [name for name, up in models.items() if not up]
    stopping = request.app.state.drain.stopping
    serves = any(models.values()) if any_model is not None else not waiting
    ok = serves and not stopping
    status = "draining" if stopping else "ready" if ok else "not ready"
    hide = _guarded(bool(gateway.settings.api_keys), request)  # /ready is open: less said behind keys
    detail = {pool.name: down for pool in gateway.pools.values() if (down := pool.down(hide))}
    body: dict[str, Any] = {"status": status, "models": models, "not_ready": waiting, "detail": detail}
    adapters = {m.name: loaded_on(m, hide) for m in gateway.models.values() if m.adapter is not None}
    if adapters and not hide:  # ready with its model; where it is loaded, as this process knows
        body["adapters"] = adapters
    return JSONResponse(body, status_code=200 if ok else 503)


def _guarded(static_keys: bool, request: Request) -> bool:
    """Whether keys guard the gateway's other routes: configured ones, or keys managed at runtime."""
    tenants = getattr(request.app.state, "tenants", None)
    return static_keys or bool(tenants is not None and tenants.closed)


def loaded_on(model: ServedModel, hide_addresses: bool) -> list[str]:
    """The replicas holding an adapter, by label (`<model>-<index>` for ones known by address when
    addresses are hidden)."""
    found = []
    for index, worker in enumerate(model.pool.workers):
        if worker.healthy and worker.affinity(model.name):  # a worker that is down holds nothing
            hidden = hide_addresses and worker.label == address_of(worker.url)
            found.append(f"{model.pool.name}-{index}" if hidden else worker.label)
    return found


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
