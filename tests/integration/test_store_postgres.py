"""The store's migrations on a real PostgreSQL (Debian's server, a throwaway cluster)."""

from __future__ import annotations

from service.store.database import Database
from tests.postgres import running_postgres
from tests.unit.test_store import schema_differences


def test_migrations_build_the_declared_tables_on_postgresql() -> None:
    with running_postgres() as server:
        database = Database(server.create_database("gateway"))
        try:
            database.migrate()
            database.migrate()
            assert schema_differences(database) == []
        finally:
            database.close()
