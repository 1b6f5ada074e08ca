"""Adapters registered at runtime, in the store. Every write bumps the "adapters" topic's revision in
the same transaction, so a gateway process sees a change by reading one small row (`snapshot`).

These functions block: run them on the store's threads (`Database.run`), never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from service.store.database import Database
from service.store.schema import adapters, revisions

TOPIC = "adapters"


class AdapterExists(Exception):
    """An adapter of that name is registered already (by this process or another)."""


@dataclass(frozen=True)
class AdapterRow:
    """One registered adapter as stored."""

    name: str
    model: str
    path: str
    kind: str
    chat_template: str | None  # the template's text, read once at registration
    description: str = ""
    created_at: datetime | None = None


def snapshot(database: Database, known: int | None) -> tuple[int, list[AdapterRow] | None]:
    """The topic's revision, and every registered adapter unless the revision is still `known`."""
    with database.transaction() as connection:
        revision = connection.execute(
            select(revisions.c.revision).where(revisions.c.topic == TOPIC)
        ).scalar_one_or_none()
        current = int(revision or 0)
        if current == known:
            return current, None
        rows = connection.execute(select(adapters).order_by(adapters.c.created_at, adapters.c.name))
        return current, [_read(row._mapping) for row in rows]


def _read(values: Any) -> AdapterRow:
    """A stored row; its time in UTC whatever the database hands back (SQLite forgets the zone, so the
    row just added compared unequal to itself as read back, and was taken for a new one)."""
    row = AdapterRow(**values)
    if row.created_at is not None and row.created_at.tzinfo is None:
        row = AdapterRow(**{**row.__dict__, "created_at": row.created_at.replace(tzinfo=UTC)})
    return row


def find(database: Database, name: str) -> AdapterRow | None:
    """The registration of `name`, if there is one."""
    with database.transaction() as connection:
        row = connection.execute(select(adapters).where(adapters.c.name == name)).first()
    return _read(row._mapping) if row is not None else None


def add(database: Database, row: AdapterRow) -> AdapterRow:
    """Store a new adapter (AdapterExists if its name is taken); the row as stored."""
    stored = AdapterRow(**{**row.__dict__, "created_at": row.created_at or datetime.now(UTC)})
    try:
        with database.transaction() as connection:
            connection.execute(insert(adapters).values(**stored.__dict__))
            bump(connection, TOPIC)
    except IntegrityError as exc:
        raise AdapterExists(row.name) from exc
    return stored


def remove(database: Database, name: str, known: AdapterRow | None = None) -> bool:
    """Forget an adapter (only if it is still the registration `known`, when given: a removal decided
    on a stale view must not take a registration made since); whether it was removed."""
    with database.transaction() as connection:
        if known is not None:
            # Locked until the delete (PostgreSQL): a registration made meanwhile cannot be the one deleted.
            query = select(adapters).where(adapters.c.name == name).with_for_update()
            row = connection.execute(query).first()
            found = _read(row._mapping) if row is not None else None
            if found is None or (found.path, found.created_at) != (known.path, known.created_at):
                return False
        removed = connection.execute(delete(adapters).where(adapters.c.name == name)).rowcount
        if removed:
            bump(connection, TOPIC)
    return bool(removed)


def bump(connection: Connection, topic: str) -> None:
    """One more revision of `topic` (its row created at 1), within the caller's transaction."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(revisions).values(topic=topic, revision=1)
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=[revisions.c.topic], set_={"revision": revisions.c.revision + 1}
        )
    )
