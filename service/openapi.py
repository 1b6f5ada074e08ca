"""The OpenAPI schema, made to tell the truth about errors: every operation may answer the OpenAI
error envelope (400, not FastAPI's 422, for validation), and generation may answer an event stream."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_STATUSES = {
    "400": "Invalid request (validation, context length, caps, base model on chat)",
    "401": "Missing or invalid API key",
    "404": "Unknown model or route",
    "413": "Request body too large",
    "429": "Rate limit exceeded",
    "499": "Client disconnected",
    "500": "Internal error",
    "502": "A worker failed or answered garbage",
    "503": "No healthy worker, over capacity, or shutting down",
    "504": "A worker timed out",
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
STREAMING_PATHS = {"/complete", "/chat", "/v1/completions", "/v1/chat/completions"}
# One server-sent event: `data` is a JSON payload (or `[DONE]`, the last one).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}


def install_openapi(app: FastAPI) -> None:
    """Replace the app's schema builder with one that documents the envelope."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorEnvelope"] = ERROR_SCHEMA
        reference = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in ERROR_STATUSES.items():
                    responses[status] = {"description": description, **reference}
                if path in STREAMING_PATHS:
                    content = responses.setdefault("200", {}).setdefault("content", {})
                    content["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
