"""Writes SQLite and PostgreSQL both take in one statement: insert-or-update by primary key, and a topic's
revision bumped in the writer's transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from service.store.schema import revisions


def upsert(
    connection: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    updates: Callable[[Any], Mapping[str, Any]] | None = None,
) -> None:
    """Insert `rows`; a row whose primary key (`keys`) exists gets its other columns from the new row,
    or those `updates(excluded)` gives (expressions over `excluded`, the new row)."""
    if not rows:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    excluded = statement.excluded
    columns = updates(excluded) if updates else {name: excluded[name] for name in rows[0] if name not in keys}
    connection.execute(
        statement.on_conflict_do_update(index_elements=list(keys), set_=dict(columns)), list(rows)
    )


def bump(connection: Connection, topic: str) -> int:
    """Raise `topic`'s revision by one in the caller's transaction (every process follows it); the new one."""
    changed = connection.execute(
        update(revisions).where(revisions.c.topic == topic).values(revision=revisions.c.revision + 1)
    )
    if changed.rowcount == 0:
        upsert(connection, revisions, [{"topic": topic, "revision": 1}], ["topic"],
               lambda _: {"revision": revisions.c.revision + 1})  # fmt: skip
    return revision(connection, topic)


def revision(connection: Connection, topic: str) -> int:
    """`topic`'s revision (0 before its first change)."""
    found = connection.execute(select(revisions.c.revision).where(revisions.c.topic == topic)).scalar()
    return int(found or 0)
