"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import GatewayDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """200 while the process serves."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(gateway: GatewayDep) -> JSONResponse:
    """200 when every model has a healthy worker; else 503 naming the models that have none."""
    models = {pool.name: pool.ready for pool in gateway.pools.values()}
    waiting = [name for name, up in models.items() if not up]
    status = 200 if not waiting else 503
    body = {"status": "ready" if not waiting else "not ready", "models": models, "not_ready": waiting}
    return JSONResponse(body, status_code=status)
