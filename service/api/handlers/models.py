"""GET /v1/models, /v1/models/{id} and /version: what is served, in vLLM's shapes, with `kind`."""

from __future__ import annotations

from typing import Any

from service import __version__
from service.api.deps import GatewayDep
from service.errors import ModelNotFound
from service.workers.pool import ModelPool

CREATED = 1_700_000_000
# What the gateway says of every model, over what its worker said of it.
OWN_FIELDS = ("id", "object", "kind", "max_model_len", "ready")


def model_entry(pool: ModelPool) -> dict[str, Any]:
    """The worker's own /v1/models entry (`root`, `parent`, `permission`, ...) plus the gateway's
    (`kind`, `ready`); before any worker answered, the fields vLLM would give."""
    worker: dict[str, Any] = pool.fact("model_entry") or {}
    entry: dict[str, Any] = {
        "created": CREATED,
        "owned_by": "vllm",
        "root": pool.spec.source or pool.name,
        "parent": None,
        **worker,
    }
    entry.update(
        id=pool.name, object="model", kind=pool.kind.value, max_model_len=pool.max_model_len, ready=pool.ready
    )
    return entry


async def list_models(gateway: GatewayDep) -> dict[str, Any]:
    """Served models, each with its `kind` and `max_model_len`."""
    return {"object": "list", "data": [model_entry(pool) for pool in gateway.pools.values()]}


async def get_model(model_id: str, gateway: GatewayDep) -> dict[str, Any]:
    """One served model."""
    pool = gateway.pools.get(model_id)
    if pool is None:
        raise ModelNotFound(model_id, list(gateway.pools))
    return model_entry(pool)


async def version(gateway: GatewayDep) -> dict[str, Any]:
    """The workers' vLLM version (what vLLM's /version answers) and the gateway's own."""
    found = next((v for pool in gateway.pools.values() if (v := pool.fact("version"))), None)
    return {"version": found, "gateway_version": __version__}
