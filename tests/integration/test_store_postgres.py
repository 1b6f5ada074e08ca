"""The store's migrations on a real PostgreSQL (Debian's server, a throwaway cluster)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from sqlalchemy import text

from service.store.database import MIGRATION_LOCK, Database
from tests.adapters import adapter_folder
from tests.integration.conftest import running_gateway
from tests.integration.standin import Script
from tests.integration.test_adapters import ADMIN, lora_settings
from tests.postgres import running_postgres
from tests.unit.test_adapter_serving import store_steps
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


def test_a_pod_starting_while_another_migrates_waits_for_it() -> None:
    """The sessions' 5 s lock limit once applied to the migration's lock too: a pod starting while another
    migrated failed (review of issue 22)."""
    with running_postgres() as server:
        url = server.create_database("gateway")
        other, starting = Database(url), Database(url)
        try:
            with other.engine.begin() as migrating:  # another pod's migration holds the lock for 7 s
                migrating.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK})
                waiting = threading.Thread(target=starting.migrate)
                waiting.start()
                time.sleep(7)
                assert waiting.is_alive()  # still waiting, not failed
            waiting.join(60)
            assert not waiting.is_alive() and schema_differences(starting) == []
        finally:
            other.close()
            starting.close()


def test_registered_adapters_on_postgresql() -> None:
    with running_postgres() as server:
        database = Database(server.create_database("adapters"))
        try:
            store_steps(database)
        finally:
            database.close()


async def test_two_pods_on_one_postgresql_serve_the_same_adapters(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    folder = adapter_folder(tmp_path, "pods")
    body = {"model": "base", "name": "pods", "path": str(folder)}
    with running_postgres() as server:
        url = server.create_database("gateway")
        one, two = (lora_settings(standin_url, tmp_path, database_url=url) for _ in range(2))
        async with running_gateway(one) as (_, first), running_gateway(two) as (_, second):
            assert (await first.post("/adapters", json=body, headers=ADMIN)).status_code == 200
            started = time.monotonic()
            while (await second.post("/complete", json={"model": "pods", "prompt": "Hi"})).status_code != 200:
                assert time.monotonic() - started < 3, "the second pod did not follow the registration"
                await asyncio.sleep(0.05)
            assert (await second.delete("/adapters/pods", headers=ADMIN)).status_code == 200
            started = time.monotonic()
            while (await first.post("/complete", json={"model": "pods", "prompt": "Hi"})).status_code != 404:
                assert time.monotonic() - started < 3, "the first pod did not follow the removal"
                await asyncio.sleep(0.05)
