"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import GatewayDep
from service.core.served import ServedModel
from service.ops.metrics import CONTENT_TYPE, Metrics
from service.workers.worker import address_of


async def health() -> dict[str, str]:
    """200 while the process serves."""
    return {"status": "ok"}


async def ready(gateway: GatewayDep, request: Request) -> JSONResponse:
    """200 when every model has a healthy worker; else 503 naming the models that have none.
    Draining (after SIGTERM): 503 at once."""
    models = {pool.name: pool.ready for pool in gateway.pools.values()}
    waiting = [name for name, up in models.items() if not up]
    stopping = request.app.state.drain.stopping
    ok = not waiting and not stopping
    status = "draining" if stopping else "ready" if ok else "not ready"
    body: dict[str, Any] = {"status": status, "models": models, "not_ready": waiting}
    settings = gateway.settings
    hide = bool(settings.api_keys)  # open route: no worker addresses while keys guard the rest
    adapters = {m.name: loaded_on(m, hide) for m in gateway.models.values() if m.adapter is not None}
    if adapters:  # an adapter is ready with its model; where it is loaded, as this process knows
        body["adapters"] = adapters
    return JSONResponse(body, status_code=200 if ok else 503)


def loaded_on(model: ServedModel, hide_addresses: bool) -> list[str]:
    """The replicas holding an adapter, by label (`<model>-<index>` for ones known by address when
    addresses are hidden)."""
    found = []
    for index, worker in enumerate(model.pool.workers):
        if worker.affinity(model.name):
            hidden = hide_addresses and worker.label == address_of(worker.url)
            found.append(f"{model.pool.name}-{index}" if hidden else worker.label)
    return found


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
