"""API key records: created with their policy, listed, revoked (the row stays, so usage keeps a name).
Each change bumps the `keys` revision in the same transaction, which every gateway process follows."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, update

from service.store.rows import bump
from service.store.schema import api_keys

TOPIC = "keys"


class KeysFull(Exception):
    """The store already holds the most live keys allowed."""

    def __init__(self, live: int) -> None:
        super().__init__(f"{live} live keys")
        self.live = live


def insert_key(connection: Connection, row: Mapping[str, Any], max_live: int | None = None) -> int:
    """Store a new key's row, unless `max_live` live keys exist already (KeysFull); the `keys` revision
    after it."""
    current = bump(connection, TOPIC)  # first: its row lock makes concurrent creations count in turn
    if max_live is not None:
        live = connection.execute(
            select(func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
        ).scalar_one()
        if live >= max_live:
            raise KeysFull(int(live))
    connection.execute(api_keys.insert().values(**row))
    return current


def revoke_key(connection: Connection, key_id: str, when: datetime) -> dict[str, Any] | None:
    """Mark a key revoked (kept if it already was); its row after, or None when there is no such key."""
    changed = connection.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=when)
    )
    if changed.rowcount:
        bump(connection, TOPIC)
    found = connection.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
    return dict(found) if found is not None else None


def all_keys(connection: Connection) -> list[dict[str, Any]]:
    """Every key's row, revoked ones included, oldest first."""
    rows = connection.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id))
    return [dict(row) for row in rows.mappings()]
