"""The table of every endpoint the gateway serves (see `service.api.endpoint` for what is derived)."""

from __future__ import annotations

from service.api.endpoint import Endpoint
from service.api.handlers import adapters, health, keys, models, native, openai, playground, tokens
from service.core.adapter_checks import AdapterRequest
from service.core.key_policy import NewKey
from service.core.protocol import (
    ChatRequest,
    ChatResponse,
    CompleteRequest,
    CompleteResponse,
    DetokenizeRequest,
    RenderRequest,
    RenderResponse,
    TokenizeRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
    V1ResponsesRequest,
)

ENDPOINTS: tuple[Endpoint, ...] = (
    # The native API.
    Endpoint("/complete", "Continue text on a base model (few-shot `examples` build a pattern prompt; "
             "`continuation` scores a text instead).", "native", body=CompleteRequest,
             handler=native.complete, metric="complete", streams=True, response=CompleteResponse),
    Endpoint("/chat", "Next assistant turn on an instruct model; the chat template is rendered here.",
             "native", body=ChatRequest, handler=native.chat, metric="chat", streams=True,
             response=ChatResponse),
    Endpoint("/chat/render", "The exact prompt text and token ids a /chat request would send to the worker.",
             "native", body=RenderRequest, handler=native.render, metric="chat_render",
             response=RenderResponse),
    # The OpenAI-compatible API (vLLM's, as a superset).
    Endpoint("/v1/completions", "OpenAI text completion (any model; base models are what it is for).",
             "openai", body=V1CompletionRequest, handler=openai.completions, metric="v1_completions",
             streams=True),
    Endpoint("/v1/chat/completions", "OpenAI chat completion on an instruct model.",
             "openai", body=V1ChatRequest, handler=openai.chat, metric="v1_chat_completions",
             streams=True),
    Endpoint("/v1/chat/completions/batch", "Several conversations answered in one call (vLLM's batch route).",
             "openai", body=V1BatchChatRequest, handler=openai.batch_chat, metric="v1_chat_batch"),
    Endpoint("/v1/responses", "OpenAI's Responses API on an instruct model.", "openai",
             body=V1ResponsesRequest, handler=openai.responses, metric="v1_responses", streams=True),
    Endpoint("/v1/models", "Served models, each with its `kind` and `max_model_len`.", "openai",
             method="GET", handler=models.list_models),
    Endpoint("/v1/models/{model_id:path}", "One served model.", "openai", method="GET",
             handler=models.get_model),
    # vLLM's tokenizer and server routes.
    Endpoint("/tokenize", "Token ids of a prompt or of chat messages (rendered as a chat request would be).",
             "tokenizer", body=TokenizeRequest, handler=tokens.tokenize, metric="tokenize"),
    Endpoint("/detokenize", "The text of token ids.", "tokenizer", body=DetokenizeRequest,
             handler=tokens.detokenize, metric="detokenize"),
    Endpoint("/tokenizer_info", "A model's tokenizer configuration (lm-eval's remote tokenizer reads it).",
             "tokenizer", method="GET", handler=tokens.tokenizer_info),
    Endpoint("/version", "The workers' vLLM version, as vLLM answers it.", "health", method="GET",
             handler=models.version),
    # The operator's routes (GATEWAY_ADMIN_KEYS only): fine-tuned variants served at runtime.
    Endpoint("/adapters", "Register a LoRA adapter on a model's workers, under its own name and kind "
             "(checked, loaded on one replica, then served by every gateway process).", "operator",
             body=AdapterRequest, handler=adapters.add, metric="adapters_add", admin=True),
    Endpoint("/adapters", "Every adapter, its kind and model, and the replicas that hold it.", "operator",
             method="GET", handler=adapters.listing, admin=True),
    Endpoint("/adapters/{name:path}", "Stop serving a registered adapter (requests under way finish).",
             "operator", method="DELETE", handler=adapters.remove, admin=True),
    Endpoint("/v1/load_lora_adapter", "vLLM's runtime LoRA API: registers the adapter as POST /adapters "
             "does, for the one model that takes adapters or the one it was trained from.", "operator",
             body=adapters.VllmLoadRequest, handler=adapters.vllm_load, metric="v1_load_lora_adapter",
             admin=True),
    Endpoint("/v1/unload_lora_adapter", "vLLM's runtime LoRA API: removes the adapter as DELETE "
             "/adapters/{name} does.", "operator", body=adapters.VllmUnloadRequest,
             handler=adapters.vllm_unload, metric="v1_unload_lora_adapter", admin=True),
    # Health, metrics, the playground.
    Endpoint("/health", "200 while the process serves; the gateway's version.", "health", method="GET",
             handler=health.health, open=True, drained=False),
    Endpoint("/ready", "200 when every model has a healthy worker (`?any`: some model, for load balancers); "
             "else 503 naming those that have none.",
             "health", method="GET", handler=health.ready, open=True, drained=False),
    Endpoint("/metrics", "Prometheus text format.", "health", method="GET", handler=health.metrics,
             drained=False),
    Endpoint("/", "The playground page.", "playground", method="GET", handler=playground.playground,
             open=True),
    Endpoint("/favicon.ico", "The gateway's icon.", "playground", method="GET", handler=playground.favicon,
             open=True),
    # The operator's: API keys and usage (GATEWAY_ADMIN_KEYS only).
    Endpoint("/keys", "Create an API key with its policy (models, kinds, rate, concurrency, token budget); "
             "the answer holds its secret, shown this once.", "operator", body=NewKey, handler=keys.create,
             metric="keys_create", admin=True),
    Endpoint("/keys", "API keys (never their secrets), with each budget's numbers.", "operator",
             method="GET", handler=keys.list_keys, admin=True),
    Endpoint("/keys/{key}", "Revoke an API key (by id, or a name one key has).", "operator",
             method="DELETE", handler=keys.revoke, admin=True),
    Endpoint("/usage", "Usage per key, served model and day: requests, errors, tokens in and out.",
             "operator", method="GET", handler=keys.usage, admin=True),
)  # fmt: skip
