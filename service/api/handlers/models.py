"""GET /v1/models, /v1/models/{id} and /version: what is served, in vLLM's shapes, with `kind`."""

from __future__ import annotations

import re
from typing import Any

from service.api.deps import CallerDep, GatewayDep
from service.core.gateway import Gateway
from service.core.served import ServedModel
from service.core.tenancy import Caller
from service.errors import ModelNotFound

CREATED = 1_700_000_000
# A folder on a host (absolute, home-relative, dot-relative, or a Windows drive), not a hub id.
HOST_PATH = re.compile(r"^(?:[/~\\]|\.\.?[/\\]|[A-Za-z]:[/\\])")
# What the gateway says of every model, over what its worker said of it.
OWN_FIELDS = ("id", "object", "kind", "max_model_len", "ready")


def model_entry(model: ServedModel, hide_paths: bool = False) -> dict[str, Any]:
    """The worker's own /v1/models entry (`root`, `parent`, `permission`, ...) plus the gateway's
    (`kind`, `ready`); before any worker answered, the fields vLLM would give. An adapter is listed as
    vLLM lists one: `root` its folder, `parent` its model's served name. With `hide_paths`, a `root`
    that is a folder on a host (vLLM's `--model`) is the served name instead."""
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
    if hide_paths and isinstance(entry["root"], str) and HOST_PATH.match(entry["root"]):
        entry["root"] = model.name
    return entry


def hides_paths(gateway: Gateway, caller: Caller) -> bool:
    """Whether model entries hide host paths: with API keys, callers are tenants, not the operator.
    Without keys the entry is vLLM's own (`vllm bench serve` without `--model` reads `root` as its
    tokenizer's path, which works on the gateway's host)."""
    return bool(gateway.settings.api_keys) or caller.key_id is not None


async def list_models(gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    """Served models, each with its `kind` and `max_model_len` (for a key with a policy, those it may use)."""
    policy = caller.policy
    models = [model for model in gateway.models.values() if policy is None or policy.allows(model)]
    hide = hides_paths(gateway, caller)
    return {"object": "list", "data": [model_entry(model, hide) for model in models]}


async def get_model(model_id: str, gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    """One served model."""
    model = gateway.models.get(model_id)
    policy = caller.policy
    if model is None or (policy is not None and not policy.allows(model)):  # hidden as in the list
        raise ModelNotFound(
            model_id, [m.name for m in gateway.models.values() if policy is None or policy.allows(m)]
        )
    return model_entry(model, hides_paths(gateway, caller))


async def version(gateway: GatewayDep) -> dict[str, Any]:
    """The workers' vLLM version, in vLLM's own shape (`{"version"}` and nothing else: clients compare
    it with what vLLM answers); the gateway's own version is on /health."""
    found = next((v for pool in gateway.pools.values() if (v := pool.fact("version"))), None)
    return {"version": found}
