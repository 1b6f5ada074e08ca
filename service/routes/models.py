"""GET /v1/models: the served models."""

from __future__ import annotations

from typing import Any

from service.deps import GatewayDep

CREATED = 1_700_000_000


async def list_models(gateway: GatewayDep) -> dict[str, Any]:
    """Served models, each with its `kind` and `max_model_len`."""
    return {
        "object": "list",
        "data": [
            {
                "id": pool.name,
                "object": "model",
                "created": CREATED,
                "owned_by": "llm-gateway",
                "kind": pool.kind.value,
                "max_model_len": pool.max_model_len,
                "ready": pool.ready,
            }
            for pool in gateway.pools.values()
        ],
    }
