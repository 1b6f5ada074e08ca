"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service import __version__
from service.api.deps import GatewayDep
from service.ops.metrics import CONTENT_TYPE, Metrics


async def health() -> dict[str, str]:
    """200 while the process serves, with the gateway's version (GET /version is the workers' vLLM's)."""
    return {"status": "ok", "version": __version__}


async def ready(gateway: GatewayDep, request: Request) -> JSONResponse:
    """200 when every model has a healthy worker; else 503 naming the models that have none.
    Draining (after SIGTERM): 503 at once."""
    models = {pool.name: pool.ready for pool in gateway.pools.values()}
    waiting = [name for name, up in models.items() if not up]
    stopping = request.app.state.drain.stopping
    ok = not waiting and not stopping
    status = "draining" if stopping else "ready" if ok else "not ready"
    body = {"status": status, "models": models, "not_ready": waiting}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
