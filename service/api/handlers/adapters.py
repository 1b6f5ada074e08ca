"""The operator's adapter routes (admin keys only, see api/admin_auth.py): register a LoRA adapter on a
model's workers, list the adapters with where they are loaded, remove one; and vLLM's own runtime LoRA
routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) taken as the same registration and removal, so
an operator's script written against vLLM works through the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import GatewayDep
from service.core.adapter_checks import AdapterRequest, model_for
from service.core.adapters import AdapterRegistry, describe_adapter
from service.core.context import RequestContext
from service.core.gateway import Gateway
from service.errors import InvalidRequest
from service.ops.settings import ServedName


class VllmLoadRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: ServedName = Field(min_length=1, max_length=128, description="Its served name.")
    lora_path: str = Field(min_length=1, max_length=4096, description="Its folder (absolute).")
    load_inplace: bool = Field(default=False, description="Not taken: remove, then load again.")
    is_3d_lora_weight: bool = Field(default=False, description="Not taken through the gateway.")


class VllmUnloadRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=128, description="The adapter's served name.")
    lora_int_id: int | None = Field(default=None, description="Ignored (vLLM's internal id).")


def registry_of(gateway: Gateway) -> AdapterRegistry:
    """The app's adapter registry (started by the lifespan with the gateway)."""
    registry: AdapterRegistry = gateway.registry
    return registry


async def add(gateway: Gateway, request: AdapterRequest, ctx: RequestContext) -> Response:
    """POST /adapters: checked, loaded onto one replica and tried there, stored, then served by every
    gateway process. Shielded from the operator's client leaving: a registration half done would leave
    an adapter loaded and not served."""
    served = await asyncio.shield(registry_of(gateway).register(request))
    return JSONResponse(describe_adapter(served))


async def listing(gateway: GatewayDep) -> dict[str, Any]:
    """GET /adapters: every adapter (configured and registered), its kind, model, and the replicas that
    hold it and run it, as the workers say now."""
    return {"object": "list", "data": await registry_of(gateway).listing()}


async def remove(name: str, gateway: GatewayDep) -> dict[str, Any]:
    """DELETE /adapters/{name}: new requests get 404 at once; requests under way finish; it is
    unloaded from the workers after them."""
    removed = await registry_of(gateway).remove(name)
    return {"name": removed, "removed": True}


async def vllm_load(gateway: Gateway, request: VllmLoadRequest, ctx: RequestContext) -> Response:
    """POST /v1/load_lora_adapter: registered as POST /adapters registers it, for the one model that
    takes adapters (or the one it was trained from); answered as vLLM answers."""
    for field in ("load_inplace", "is_3d_lora_weight"):
        if getattr(request, field):
            raise InvalidRequest(f"{field} is not taken through the gateway: remove the adapter (POST "
                                 "/v1/unload_lora_adapter), then load it again.", param=field)  # fmt: skip
    registry = registry_of(gateway)
    takers = [m for m in gateway.models.values() if m.adapter is None and m.spec.lora_enabled]
    parent = await asyncio.to_thread(model_for, request.lora_path, takers, gateway.settings)
    registration = AdapterRequest(model=parent.name, name=request.lora_name, path=request.lora_path)
    served = await asyncio.shield(registry.register(registration))
    return PlainTextResponse(f"Success: LoRA adapter '{served.name}' added successfully.")


async def vllm_unload(gateway: Gateway, request: VllmUnloadRequest, ctx: RequestContext) -> Response:
    """POST /v1/unload_lora_adapter: removed as DELETE /adapters/{name} removes it; answered as vLLM."""
    removed = await registry_of(gateway).remove(request.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{removed}' removed successfully.")
