"""The table of every endpoint the gateway serves (see `service.endpoint` for what is derived)."""

from __future__ import annotations

from service import serving
from service.endpoint import Endpoint
from service.protocol import (
    ChatRequest,
    ChatResponse,
    CompleteRequest,
    CompleteResponse,
    RenderRequest,
    RenderResponse,
    V1ChatRequest,
    V1CompletionRequest,
)
from service.routes import health, models, playground

ENDPOINTS: tuple[Endpoint, ...] = (
    # The native API.
    Endpoint("/complete", "Continue text on a base model (few-shot `examples` build a pattern prompt).",
             "native", body=CompleteRequest, handler=serving.complete, metric="complete", streams=True,
             response=CompleteResponse),
    Endpoint("/chat", "Next assistant turn on an instruct model; the chat template is rendered here.",
             "native", body=ChatRequest, handler=serving.chat, metric="chat", streams=True,
             response=ChatResponse),
    Endpoint("/chat/render", "The exact prompt text and token ids a /chat request would send to the worker.",
             "native", body=RenderRequest, handler=serving.render, metric="chat_render",
             response=RenderResponse),
    # The OpenAI-compatible API.
    Endpoint("/v1/completions", "OpenAI text completion (any model; base models are what it is for).",
             "openai", body=V1CompletionRequest, handler=serving.v1_completions, metric="v1_completions",
             streams=True),
    Endpoint("/v1/chat/completions", "OpenAI chat completion on an instruct model.",
             "openai", body=V1ChatRequest, handler=serving.v1_chat, metric="v1_chat_completions",
             streams=True),
    Endpoint("/v1/models", "Served models, each with its `kind` and `max_model_len`.", "openai",
             method="GET", handler=models.list_models),
    # Health, metrics, the playground.
    Endpoint("/health", "200 while the process serves.", "health", method="GET", handler=health.health,
             open=True, drained=False),
    Endpoint("/ready", "200 when every model has a healthy worker; else 503 naming those that have none.",
             "health", method="GET", handler=health.ready, open=True, drained=False),
    Endpoint("/metrics", "Prometheus text format.", "health", method="GET", handler=health.metrics,
             drained=False),
    Endpoint("/", "The playground page.", "playground", method="GET", handler=playground.playground,
             open=True),
)  # fmt: skip
