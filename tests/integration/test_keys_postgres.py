"""Keys on a real PostgreSQL (Debian's server, a throwaway cluster) stopped in the middle of the load and
started again: requests of a known key keep being served within what the gateway holds, usage waits in
memory and is written when the database is back, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from service.store.database import Database
from service.store.ledger import status
from service.store.usage import read_usage
from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import Script
from tests.postgres import running_postgres

ADMIN = {"Authorization": "Bearer admin-1"}
BODY = {"model": "base", "prompt": "hi", "max_tokens": 4}


async def load(
    http: httpx.AsyncClient, headers: dict[str, str], until: asyncio.Event, seen: list[Any]
) -> None:
    """Requests one after another until `until` is set; each (status, tokens, error code) kept."""
    while not until.is_set():
        answer = await http.post("/v1/completions", json=BODY, headers=headers)
        body = answer.json()
        tokens = body["usage"]["total_tokens"] if answer.status_code == 200 else 0
        seen.append((answer.status_code, tokens, (body.get("error") or {}).get("code")))
        await asyncio.sleep(0.005)


async def test_a_database_stopped_mid_load_loses_and_doubles_nothing(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    with running_postgres() as server:
        url = server.create_database("gateway")
        settings = standin_settings(
            standin_url, admin_keys="admin-1", database_url=url, keys_sync_interval=0.2, keys_store_wait=0.5
        )
        seen: list[Any] = []
        outage: list[Any] = []
        async with running_gateway(settings) as (_, http):
            created = await http.post("/keys", headers=ADMIN, json={
                "name": "app", "rate_limit": "100000/minute", "max_concurrent": 8,
                "token_budget": {"tokens": 10_000_000, "period": "day"}})  # fmt: skip
            key_id, headers = created.json()["id"], {"Authorization": f"Bearer {created.json()['key']}"}
            done = asyncio.Event()
            workers = [asyncio.create_task(load(http, headers, done, seen)) for _ in range(4)]
            await asyncio.sleep(1.5)
            await asyncio.to_thread(server.stop)
            stopped_at = len(seen)
            await asyncio.sleep(2.0)
            outage = seen[stopped_at:]
            assert (await http.get("/usage", headers=ADMIN)).json()["error"]["code"] == "store_unavailable"
            await asyncio.to_thread(server.start)
            await asyncio.sleep(1.5)
            done.set()
            await asyncio.gather(*workers)
            await asyncio.sleep(0.5)
            usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
        # The gateway has stopped: everything it held is written.
        database = Database(url)
        try:
            with database.transaction() as connection:
                rows = read_usage(connection, key_id=key_id)
                budget_used, held = status(connection, key_id, "tokens", int(time.time() // 86400))
        finally:
            database.close()
    statuses = Counter(code for code, _, _ in seen)
    print("outage:", Counter(code for code, _, _ in outage), "all:", statuses)
    served = sum(tokens for code, tokens, _ in seen if code == 200)
    assert sum(1 for code, _, _ in outage if code == 200) >= 10, Counter(code for code, _, _ in outage)
    assert set(statuses) <= {200, 503} and {error for _, _, error in seen} <= {None, "limits_unavailable"}
    total = {
        name: sum(row[name] for row in rows) for name in ("requests", "errors", "tokens_in", "tokens_out")
    }
    assert (total["requests"], total["errors"], total["tokens_in"] + total["tokens_out"]) == (
        len(seen), statuses[503], served)  # fmt: skip
    assert usage["requests"] <= len(seen)  # read while running: never more than was sent
    assert budget_used == served and held == 0
