"""Request ids are random: 128 bits from the kernel each, so an id says nothing of how many requests
other callers made between two of one's own (a counter, even behind a random prefix, would)."""

from __future__ import annotations

import itertools
from typing import Any

from service.api.observability import ObservabilityMiddleware
from service.ops.metrics import Metrics
from tests.helpers import call_asgi


async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_made_request_ids_share_nothing_and_count_nothing() -> None:
    app = ObservabilityMiddleware(ok, Metrics(lambda: []), labels={})
    ids = [(await call_asgi(app, "GET", "/health", headers={})).headers["x-request-id"] for _ in range(64)]
    assert all(len(made) == 32 and int(made, 16) >= 0 for made in ids)  # 32 hex digits, as a uuid4
    assert len(set(ids)) == 64
    assert len({made[:8] for made in ids}) > 32  # no prefix a process keeps (64 draws of 32 bits)
    steps = {int(b, 16) - int(a, 16) for a, b in itertools.pairwise(ids)}
    assert not steps & {1, -1}  # not a counter
    assert len({made[-4:] for made in ids}) > 32  # nor its low digits


async def test_a_sane_client_id_is_kept() -> None:
    app = ObservabilityMiddleware(ok, Metrics(lambda: []), labels={})
    answer = await call_asgi(app, "GET", "/health", headers={"x-request-id": "mine-1"})
    assert answer.headers["x-request-id"] == "mine-1"
