"""The worker's contract is the gateway's contract.

Which request fields may pass is read from each worker's own OpenAPI schema (`GET /openapi.json`,
which every vLLM OpenAI server publishes): for every request model it names (`CompletionRequest`,
`ChatCompletionRequest`, ...), the set of its properties. The gateway declares, and checks itself,
only the fields it acts on (model, prompt, messages, max_tokens, stream, n, logprobs, caps); every
other field is accepted exactly when the worker's schema has it, and forwarded untouched. So a field
that a vLLM upgrade adds works through the gateway the day the worker has it, and a field no worker
knows is a 400 that names it (vLLM itself would ignore it with a warning: a typo would silently do
nothing).

A worker that publishes no schema (started with `--disable-fastapi-docs`, or not vLLM) cannot be
checked against: its requests pass with every field, and the gateway says so once in its log. The
schema is read again whenever the worker's facts are (see facts.py): a worker upgraded in place
brings its new fields with it; one whose schema cannot be fetched for a while keeps the one it had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from service.errors import InvalidRequest
from service.workers.pool import ModelPool, Worker
from service.workers.transport import Transport

log = logging.getLogger(__name__)

# OpenAI fields that only mean something to OpenAI's own platform. vLLM accepts and ignores them
# (they are not in its schema); clients such as the Agents SDK send them, so they pass too.
OPENAI_PLATFORM_FIELDS = frozenset({"store", "metadata", "service_tier"})
SCHEMA_NAMES = (
    "CompletionRequest", "ChatCompletionRequest", "BatchChatCompletionRequest", "ResponsesRequest",
    "TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest",
)  # fmt: skip


def request_fields(openapi: Any) -> dict[str, frozenset[str]]:
    """Property names of each request model an OpenAPI document defines (of those we proxy)."""
    schemas = (openapi.get("components") or {}).get("schemas") or {} if isinstance(openapi, dict) else {}
    found: dict[str, frozenset[str]] = {}
    for name in SCHEMA_NAMES:
        schema = schemas.get(name)
        if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
            found[name] = frozenset(schema["properties"])
    return found


async def read_contract(transport: Transport, worker: Worker) -> None:
    """Fact reader (see facts.py): the worker's request schemas and its version. A schema that cannot
    be fetched raises (what was known stays, and it is fetched again next time); one fetched that
    defines none of the request models is a worker that cannot be checked against."""
    fields = request_fields(await transport.get_json(worker, "/openapi.json"))
    known: dict[str, frozenset[str]] | None = worker.facts.get("fields")
    if not fields and known != {}:
        log.warning("worker %s publishes no OpenAPI schema: request fields cannot be checked against it",
                    worker.label)  # fmt: skip
    elif known and fields != known:
        log.info("worker %s for %s: request schema changed (%s)", worker.label, worker.model,
                 schema_change(known, fields))  # fmt: skip
    worker.facts["fields"] = fields
    try:
        answer = await transport.get_json(worker, "/version")
    except Exception:  # not every server says (any failure): the version known before, if any, stays
        return
    version = answer.get("version") if isinstance(answer, dict) else None
    if worker.facts.get("version") not in (None, version):
        log.info("worker %s for %s: version %s -> %s", worker.label, worker.model,
                 worker.facts["version"], version)  # fmt: skip
    worker.facts["version"] = version


def schema_change(before: dict[str, frozenset[str]], after: dict[str, frozenset[str]]) -> str:
    """Fields added and removed across the request models, for a log line."""
    old = {f"{name}.{field}" for name, fields in before.items() for field in fields}
    new = {f"{name}.{field}" for name, fields in after.items() for field in fields}
    return f"added {sorted(new - old)[:10]}, removed {sorted(old - new)[:10]}"


def check_fields(pool: ModelPool, schema: str, fields: Iterable[str], need_worker: bool = True) -> None:
    """Refuse (400) the first of `fields` that the model's worker does not accept in `schema`.
    `fields` are those the gateway does not declare itself (the request's extras)."""
    known: dict[str, frozenset[str]] | None = pool.fact("fields")
    if known is None:
        if need_worker:
            pool.healthy_workers()  # raises the 503 that says no worker has been seen yet
        return
    accepted = known.get(schema)
    if accepted is None:
        return  # this worker publishes no schema for it: cannot check
    for name in fields:
        if name not in accepted and name not in OPENAI_PLATFORM_FIELDS:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {name} (the model's vLLM server does not accept "
                f"it in {schema}).",
                param=name,
                code="unknown_field",
            )
