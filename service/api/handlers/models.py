"""GET /v1/models, /v1/models/{id} and /version: what is served, in vLLM's shapes, with `kind`."""

from __future__ import annotations

from typing import Any

from service import __version__
from service.api.deps import GatewayDep
from service.core.served import ServedModel
from service.errors import ModelNotFound

CREATED = 1_700_000_000
# What the gateway says of every model, over what its worker said of it.
OWN_FIELDS = ("id", "object", "kind", "max_model_len", "ready")


def model_entry(model: ServedModel) -> dict[str, Any]:
    """The worker's own /v1/models entry (`root`, `parent`, `permission`, ...) plus the gateway's
    (`kind`, `ready`); before any worker answered, the fields vLLM would give. An adapter is listed as
    vLLM lists one: `root` its folder, `parent` its model's served name."""
    pool = model.pool
    worker: dict[str, Any] = pool.fact("model_entry") or {}
    entry: dict[str, Any] = {
        "created": CREATED,
        "owned_by": "vllm",
        "root": pool.spec.source or pool.name,
        "parent": None,
        **worker,
    }
    if model.adapter is not None:
        entry.update(root=model.adapter.path, parent=model.adapter.model)
    entry.update(
        id=model.name,
        object="model",
        kind=model.kind.value,
        max_model_len=model.max_model_len,
        ready=pool.ready,
    )
    return entry


async def list_models(gateway: GatewayDep) -> dict[str, Any]:
    """Served models, each with its `kind` and `max_model_len`."""
    return {"object": "list", "data": [model_entry(model) for model in gateway.models.values()]}


async def get_model(model_id: str, gateway: GatewayDep) -> dict[str, Any]:
    """One served model."""
    model = gateway.models.get(model_id)
    if model is None:
        raise ModelNotFound(model_id, list(gateway.models))
    return model_entry(model)


async def version(gateway: GatewayDep) -> dict[str, Any]:
    """The workers' vLLM version (what vLLM's /version answers) and the gateway's own."""
    found = next((v for pool in gateway.pools.values() if (v := pool.fact("version"))), None)
    return {"version": found, "gateway_version": __version__}
