"""The operator's adapter routes (admin keys only, see api/admin_auth.py): register a LoRA adapter on a
model's workers, list the adapters with where they are loaded, remove one."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, Response

from service.api.deps import GatewayDep
from service.core.adapter_checks import AdapterRequest
from service.core.adapters import AdapterRegistry, describe_adapter
from service.core.context import RequestContext
from service.core.gateway import Gateway


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
    served = await registry_of(gateway).remove(name)
    return {"name": served.name, "removed": True}
