"""GET /v1/models, /v1/models/{id} and /version: what is served, in vLLM's shapes, with `kind`."""

from __future__ import annotations

from typing import Any

from service import __version__
from service.api.deps import CallerDep, GatewayDep
from service.core.served import ServedModel
from service.errors import ModelNotFound

CREATED = 1_700_000_000
# What the gateway says of every model, over what its worker said of it.
OWN_FIELDS = ("id", "object", "kind", "max_model_len", "ready")


def model_entry(model: ServedModel) -> dict[str, Any]:
    """The worker's own /v1/models entry (`root`, `parent`, `permission`, ...) plus the gateway's
    (`kind`, `ready`); before any worker answered, the fields vLLM would give."""
    pool = model.pool
    worker: dict[str, Any] = pool.fact("model_entry") or {}
    entry: dict[str, Any] = {
        "created": CREATED,
        "owned_by": "vllm",
        "root": pool.spec.source or pool.name,
        "parent": None,
        **worker,
    }
    entry.update(
        id=model.name,
        object="model",
        kind=model.kind.value,
        max_model_len=model.max_model_len,
        ready=pool.ready,
    )
    return entry


async def list_models(gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    """Served models, each with its `kind` and `max_model_len` (for a key with a policy, those it may use)."""
    policy = caller.policy
    models = [model for model in gateway.models.values() if policy is None or policy.allows(model)]
    return {"object": "list", "data": [model_entry(model) for model in models]}


async def get_model(model_id: str, gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    """One served model."""
    model = gateway.models.get(model_id)
    policy = caller.policy
    if model is None:
        raise ModelNotFound(
            model_id, [m.name for m in gateway.models.values() if policy is None or policy.allows(m)]
        )
    refusal = policy.refusal(model) if policy is not None else None
    if refusal is not None:
        raise refusal
    return model_entry(model)


async def version(gateway: GatewayDep) -> dict[str, Any]:
    """The workers' vLLM version (what vLLM's /version answers) and the gateway's own."""
    found = next((v for pool in gateway.pools.values() if (v := pool.fact("version"))), None)
    return {"version": found, "gateway_version": __version__}
