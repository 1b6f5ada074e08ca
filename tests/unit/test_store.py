"""The store's migrations build exactly the tables the code declares, on SQLite and on PostgreSQL, and are
safe to run again and from several processes at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.store.database import Database, NewerSchema, default_url, redacted
from service.store.schema import metadata


def schema_differences(database: Database) -> list[object]:
    with database.engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))


def test_migrations_build_the_declared_tables_on_sqlite(tmp_path: Path) -> None:
    database = Database(default_url(tmp_path))
    try:
        database.migrate()
        database.migrate()  # idempotent
        assert schema_differences(database) == []
        assert {"adapters", "revisions", "alembic_version"} <= set(inspect(database.engine).get_table_names())
    finally:
        database.close()


def _migrate(url: str) -> None:
    database = Database(url)
    database.migrate()
    database.close()


def test_processes_starting_together_migrate_once(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_migrate, args=(url,)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    database = Database(url)
    try:
        assert schema_differences(database) == []
    finally:
        database.close()


def test_a_password_never_reaches_a_log_line() -> None:
    assert "secret" not in redacted("postgresql+psycopg://gateway:secret@db:5432/gateway")


def test_a_database_a_newer_gateway_migrated_is_refused_in_words(tmp_path: Path) -> None:
    database = Database(default_url(tmp_path))
    try:
        database.migrate()
        with database.transaction() as connection:  # as a newer gateway's migration leaves it
            connection.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
        with pytest.raises(NewerSchema, match=r"0099_from_the_future.*newer gateway.*GATEWAY_DATABASE_URL"):
            database.migrate()
    finally:
        database.close()
