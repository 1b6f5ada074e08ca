"""What an endpoint is, and the facts derived from a table of them.

Each endpoint is declared once (`service.api.endpoints.ENDPOINTS`): path, method, request model,
handler, metric label, whether it streams, whether it needs an API key, whether the drain refuses
it. The dispatcher, the FastAPI routes, the OpenAPI schema, the metric labels and the auth and
drain exemptions all read the table, so adding an endpoint is one entry plus its handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from starlette.routing import compile_path

# A POST handler: (gateway, validated body, request record) -> Response.
PostHandler = Callable[[Any, Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    path: str
    summary: str
    tag: str
    method: Literal["GET", "POST", "DELETE"] = "POST"
    body: type[BaseModel] | None = None  # POST: the request model, validated from the raw bytes
    handler: Callable[..., Awaitable[Any]] | None = None  # POST: a PostHandler; GET: a FastAPI endpoint
    metric: str | None = None  # label of the gateway_* request metrics (every POST endpoint has one)
    streams: bool = False  # may answer with an event stream
    response: type[BaseModel] | None = None  # the documented 200 body
    open: bool = False  # served without an API key
    drained: bool = True  # refused once a drain stops accepting work
    admin: bool = False  # the operator's: needs one of GATEWAY_ADMIN_KEYS, never a client key


def metric_labels(table: Iterable[Endpoint]) -> dict[str, str]:
    """Path -> metric label of every endpoint whose requests are counted."""
    return {e.path: e.metric for e in table if e.metric is not None}


def shared_paths(table: Iterable[Endpoint]) -> frozenset[str]:
    """Paths of a POST endpoint that also have a GET or DELETE route (`/adapters`): only their POST
    requests carry the POST endpoint's label."""
    table = list(table)
    posts = {e.path for e in table if e.method == "POST"}
    return frozenset(e.path for e in table if e.method != "POST" and e.path in posts)


def open_paths(table: Iterable[Endpoint]) -> frozenset[str]:
    return frozenset(e.path for e in table if e.open)


def undrained_paths(table: Iterable[Endpoint]) -> frozenset[str]:
    return frozenset(e.path for e in table if not e.drained)


def admin_paths(table: Iterable[Endpoint]) -> PathSet:
    """The operator's routes (path parameters included), for the admin guard."""
    return PathSet([e.path for e in table if e.admin])


class PathSet:
    """Paths with Starlette's `{param}` placeholders, matched against a request path."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.exact = frozenset(p for p in paths if "{" not in p)
        self.patterns = [compile_path(p)[0] for p in paths if "{" in p]

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (path in self.exact or any(p.match(path) for p in self.patterns))

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)


def post_endpoints(table: Iterable[Endpoint]) -> dict[str, Endpoint]:
    """Path -> endpoint, for the dispatcher."""
    found = {e.path: e for e in table if e.method == "POST"}
    for endpoint in found.values():
        if endpoint.body is None or endpoint.handler is None or endpoint.metric is None:
            raise ValueError(f"POST {endpoint.path}: needs a body model, a handler and a metric label")
    return found
