"""Usage per key, served model and day: each gateway process writes its own rows with absolute totals (a
retried write counts nothing twice), and readers add the processes' rows up.

A process's totals only grow, so a write keeps, count by count, the larger of the stored and the written
value: a write older than one already stored (a slow transaction, a spool folded after its process wrote
again) can never lower a total."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from sqlalchemy import Connection, case, func, select

from service.store.rows import upsert
from service.store.schema import api_keys, usage

COUNTS = ("requests", "errors", "tokens_in", "tokens_out")


def write_usage(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Store a process's totals: rows of key_id, model, day, holder and the four counts (never lowered)."""
    upsert(connection, usage, rows, ["key_id", "model", "day", "holder"], _larger)


def _larger(written: Any) -> dict[str, Any]:
    """Each count's larger value, the stored one or the written one."""
    return {
        name: case((usage.c[name] > written[name], usage.c[name]), else_=written[name]) for name in COUNTS
    }


def read_usage(
    connection: Connection,
    first: date | None = None,
    last: date | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Totals per key, model and day between `first` and `last` (inclusive), every process's rows added,
    with the key's name (None for a key the store does not know: one of GATEWAY_API_KEYS)."""
    sums = [func.sum(getattr(usage.c, name)).label(name) for name in COUNTS]
    query = (
        select(usage.c.key_id, api_keys.c.name, usage.c.model, usage.c.day, *sums)
        .select_from(usage.outerjoin(api_keys, api_keys.c.id == usage.c.key_id))
        .group_by(usage.c.key_id, api_keys.c.name, usage.c.model, usage.c.day)
        .order_by(usage.c.day, usage.c.key_id, usage.c.model)
    )
    if first is not None:
        query = query.where(usage.c.day >= first)
    if last is not None:
        query = query.where(usage.c.day <= last)
    if key_id is not None:
        query = query.where(usage.c.key_id == key_id)
    if model is not None:
        query = query.where(usage.c.model == model)
    return [
        {**dict(row), **{name: int(row[name]) for name in COUNTS}}
        for row in connection.execute(query).mappings()
    ]
