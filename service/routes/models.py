"""The OpenAI-compatible API under /v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from service import serving
from service.deps import GatewayDep, RecordDep
from service.protocol import V1ChatRequest, V1CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])
CREATED = 1_700_000_000


@router.post("/completions")
async def completions(request: V1CompletionRequest, gateway: GatewayDep, record: RecordDep) -> Response:
    """OpenAI text completion (any model; base models are what it is for)."""
    return await serving.v1_completions(gateway, request, record)


@router.post("/chat/completions")
async def chat_completions(request: V1ChatRequest, gateway: GatewayDep, record: RecordDep) -> Response:
    """OpenAI chat completion on an instruct model."""
    return await serving.v1_chat(gateway, request, record)


@router.get("/models")
async def models(gateway: GatewayDep) -> dict[str, Any]:
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
