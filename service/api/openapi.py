"""The OpenAPI schema, built from the endpoint table: POST endpoints (served by the dispatcher, not
FastAPI) are documented from their request and response models; every operation may answer the
OpenAI error envelope (400, not FastAPI's 422, for validation); streaming ones an event stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from service.api.endpoint import Endpoint

ERROR_STATUSES = {
    "400": "Invalid request (validation, context length, caps, base model on chat)",
    "401": "Missing, invalid or revoked API key",
    "403": "A key that may not do this (a model outside its policy; an operator route without an admin key, "
    "or the operator API off)",
    "404": "Unknown model or route",
    "405": "Method not allowed",
    "408": "The request body did not arrive in time",
    "413": "Request body too large",
    "429": "A rate, concurrency or token-budget limit of the key",
    "499": "Client disconnected",
    "500": "Internal error",
    "501": "The model's worker does not serve this route",
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
# One server-sent event: `data` is a JSON payload (or `[DONE]`, the last one).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}


REF_TEMPLATE = "#/components/schemas/{model}"


def post_operations(endpoints: Sequence[Endpoint], components: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI path items of the table's POST endpoints; their model schemas go into `components`."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for endpoint in endpoints:
        if endpoint.method == "POST" and endpoint.body is not None:
            models.append((endpoint.body, "validation"))
            if endpoint.response is not None:
                models.append((endpoint.response, "serialization"))
    refs, top = models_json_schema(models, ref_template=REF_TEMPLATE)
    components.update(top.get("$defs", {}))
    paths: dict[str, Any] = {}
    for endpoint in endpoints:
        if endpoint.method != "POST" or endpoint.body is None:
            continue
        ok: dict[str, Any] = {"description": "Successful Response"}
        if endpoint.response is not None:
            ok["content"] = {"application/json": {"schema": refs[(endpoint.response, "serialization")]}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        paths[endpoint.path] = {
            "post": {
                "tags": [endpoint.tag],
                "summary": endpoint.summary,
                "operationId": endpoint.metric,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(endpoint.body, "validation")]}},
                },
                "responses": {"200": ok},
            }
        }
    return paths


def install_openapi(app: FastAPI, endpoints: Sequence[Endpoint]) -> None:
    """Replace the app's schema builder with one that documents the table and the envelope."""
    streaming = {endpoint.path for endpoint in endpoints if endpoint.streams}

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        paths = post_operations(endpoints, components)
        for path, operations in schema.get("paths", {}).items():  # a path may have POST and GET
            paths.setdefault(path, {}).update(operations)
        schema["paths"] = paths
        components["ErrorEnvelope"] = ERROR_SCHEMA
        reference = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in ERROR_STATUSES.items():
                    responses[status] = {"description": description, **reference}
                if path in streaming:
                    content = responses.setdefault("200", {}).setdefault("content", {})
                    content["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
