"""The native API: /complete for base models, /chat and /chat/render for instruct models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from service import serving
from service.deps import GatewayDep, RecordDep
from service.protocol import (
    ChatRequest,
    ChatResponse,
    CompleteRequest,
    CompleteResponse,
    RenderRequest,
    RenderResponse,
)

router = APIRouter(tags=["native"])


@router.post("/complete", response_model=CompleteResponse)
async def complete(request: CompleteRequest, gateway: GatewayDep, record: RecordDep) -> Response:
    """Continue text on a base model (few-shot `examples` build a pattern prompt)."""
    return await serving.complete(gateway, request, record)


@router.post("/chat", response_model=ChatResponse)
async def chat(request: ChatRequest, gateway: GatewayDep, record: RecordDep) -> Response:
    """Next assistant turn on an instruct model; the chat template is rendered here."""
    return await serving.chat(gateway, request, record)


@router.post("/chat/render", response_model=RenderResponse)
async def render(request: RenderRequest, gateway: GatewayDep) -> dict[str, Any]:
    """The exact prompt text and token ids a /chat request would send to the worker."""
    return await serving.render(gateway, request)
