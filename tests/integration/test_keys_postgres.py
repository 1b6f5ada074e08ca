"""Keys on a real PostgreSQL (Debian's server, a throwaway cluster) stopped in the middle of the load and
started again: requests of a known key keep being served within what the gateway holds, usage waits in
memory and is written when the database is back, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from service.core.keys import new_secret
from service.store import ledger
from service.store.database import Database
from service.store.usage import read_usage
from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import Script
from tests.postgres import running_postgres

ADMIN = {"Authorization": "Bearer admin-1"}
BODY = {"model": "base", "prompt": "hi", "max_tokens": 4}


async def load(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    until: asyncio.Event,
    seen: list[Any],
    pause: float = 0.005,
) -> None:
    """Requests one after another until `until` is set; each (status, tokens, error code) kept."""
    while not until.is_set():
        seen.append(await ask(http, headers))
        await asyncio.sleep(pause)


async def ask(http: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, int, str | None]:
    answer = await http.post("/v1/completions", json=BODY, headers=headers)
    body = answer.json()
    tokens = body["usage"]["total_tokens"] if answer.status_code == 200 else 0
    return answer.status_code, tokens, (body.get("error") or {}).get("code")


async def new_key(http: httpx.AsyncClient, **policy: Any) -> tuple[str, dict[str, str]]:
    created = (await http.post("/keys", headers=ADMIN, json={"name": "app", **policy})).json()
    return created["id"], {"Authorization": f"Bearer {created['key']}"}


def written(url: str, key_id: str) -> tuple[dict[str, int], int, int]:
    """A key's usage totals in the store, and (used, held) of its budget today."""
    database = Database(url)
    try:
        with database.transaction() as connection:
            rows = read_usage(connection, key_id=key_id)
            today = int(time.time() // 86400)
            budget_used, held = ledger.statuses(connection, "tokens", {key_id: today})[key_id]
    finally:
        database.close()
    names = ("requests", "errors", "tokens_in", "tokens_out")
    return {name: sum(row[name] for row in rows) for name in names}, budget_used, held


def served(seen: list[Any]) -> int:
    return sum(tokens for code, tokens, _ in seen if code == 200)


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
        limited: list[Any] = []
        async with running_gateway(settings) as (_, http):
            key_id, headers = await new_key(http, rate_limit="100000/minute", max_concurrent=8,
                                            token_budget={"tokens": 10_000_000, "period": "day"})  # fmt: skip
            # Known to this process but never used before the outage: its standby share serves it.
            idle_id, idle = await new_key(http, rate_limit="600/minute", max_concurrent=2,
                                          token_budget={"tokens": 100_000, "period": "day"})  # fmt: skip
            limited_id, limited_headers = await new_key(
                http,
                rate_limit="600/minute",
                max_concurrent=2,
                token_budget={"tokens": 3000, "period": "day"},
            )
            unknown = {"Authorization": f"Bearer {new_secret()}"}  # shaped like a runtime key
            assert (await ask(http, unknown))[0] == 401
            done = asyncio.Event()
            workers = [asyncio.create_task(load(http, headers, done, seen)) for _ in range(4)]
            workers.append(asyncio.create_task(load(http, limited_headers, done, limited, pause=0.02)))
            await asyncio.sleep(1.5)
            await asyncio.to_thread(server.stop)
            stopped_at, limited_at = len(seen), len(limited)
            await asyncio.sleep(0.5)  # the next exchanges fail: the process knows the store is away
            idle_seen = [await ask(http, idle) for _ in range(5)]
            unknown_seen = await ask(http, unknown)
            await asyncio.sleep(1.5)
            outage, limited_outage = seen[stopped_at:], limited[limited_at:]
            assert (await http.get("/usage", headers=ADMIN)).json()["error"]["code"] == "store_unavailable"
            await asyncio.to_thread(server.start)
            await asyncio.sleep(1.5)
            done.set()
            await asyncio.gather(*workers)
            assert (await ask(http, unknown))[0] == 401  # known again to be unknown
            await asyncio.sleep(0.5)
            usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
        # The gateway has stopped: everything it held is written.
        total, budget_used, held = written(url, key_id)
        idle_total, idle_used, idle_held = written(url, idle_id)
        limited_total, limited_used, limited_held = written(url, limited_id)
    statuses = Counter(code for code, _, _ in seen)
    print("outage:", Counter(code for code, _, _ in outage), "all:", statuses, "limited:",
          Counter(code for code, _, _ in limited), "limited in the outage:",
          Counter(code for code, _, _ in limited_outage))  # fmt: skip
    # Known keys are served through the outage from what the process holds (no 503 at all).
    assert sum(1 for code, _, _ in outage if code == 200) >= 10 and set(statuses) == {200}, statuses
    assert [code for code, _, _ in idle_seen] == [200] * 5
    assert sum(1 for code, _, _ in limited_outage if code == 200) >= 10
    # An unknown key cannot be checked while the store is away: it may be a key created elsewhere since.
    assert unknown_seen[0] == 503 and unknown_seen[2] == "key_uncheckable"
    # Within the limits: the rate (the whole test is well under a minute) and the budget.
    limited_codes = Counter(code for code, _, _ in limited)
    assert limited_codes[200] <= 600 and served(limited) <= 3000 and set(limited_codes) <= {200, 429, 503}
    # Written once the database is back, equal to what was served, nothing counted twice.
    checks = [(total, budget_used, held, seen), (idle_total, idle_used, idle_held, idle_seen),
              (limited_total, limited_used, limited_held, limited)]  # fmt: skip
    for got, used, still_held, answers in checks:
        errors = sum(1 for code, _, _ in answers if code != 200)
        assert (got["requests"], got["errors"], got["tokens_in"] + got["tokens_out"]) == (
            len(answers), errors, served(answers))  # fmt: skip
        assert used == served(answers) and still_held == 0
    assert usage["requests"] <= len(seen)  # read while running: never more than was sent


async def test_two_gateways_cut_off_together_stay_within_a_budget(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    budget = 3000
    with running_postgres() as server:
        url = server.create_database("gateway")
        settings = standin_settings(
            standin_url, admin_keys="admin-1", database_url=url, keys_sync_interval=0.2, keys_store_wait=0.5
        )
        seen: list[list[Any]] = [[], []]
        async with running_gateway(settings) as (_, first), running_gateway(settings) as (_, second):
            key_id, headers = await new_key(first, token_budget={"tokens": budget, "period": "day"})
            await asyncio.sleep(0.6)  # the second gateway reads the key, both learn they are two
            done = asyncio.Event()
            workers = [asyncio.create_task(load(http, headers, done, seen[index], pause=0.01))
                       for index, http in enumerate((first, second))]  # fmt: skip
            for _ in range(200):  # both hold their standby shares (a loaded machine grants them late)
                listed = (await first.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
                if listed["reserved"] >= 2 * (budget // 16) and all(len(answers) >= 5 for answers in seen):
                    break
                await asyncio.sleep(0.1)
            await asyncio.to_thread(server.stop)
            stopped_at = [len(answers) for answers in seen]
            await asyncio.sleep(3.0)
            outage = [answers[at:] for answers, at in zip(seen, stopped_at, strict=True)]
            await asyncio.to_thread(server.start)
            done.set()
            await asyncio.gather(*workers)
        total, used, held = written(url, key_id)
    answers = seen[0] + seen[1]
    print("outage:", [Counter(code for code, _, _ in part) for part in outage],
          "served:", served(answers), "of", budget)  # fmt: skip
    # Each gateway served from what the store had granted it, then refused: at most its standby share
    # (budget / (8 x 2 gateways)) and its cushion (budget / 8), whatever the other one did.
    for part in outage:
        codes = Counter(code for code, _, _ in part)
        assert codes[200] >= 5 and codes[503] > 0 and set(codes) <= {200, 503}, codes
        assert served(part) <= budget // 16 + budget // 8
        assert {error for code, _, error in part if code == 503} == {"limits_unavailable"}
    assert served(answers) <= budget
    assert (total["requests"], total["tokens_in"] + total["tokens_out"]) == (len(answers), served(answers))
    assert used == served(answers) and held == 0


async def test_a_session_that_holds_a_keys_row_stalls_nothing_for_long(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    """A pod cut off in the middle of an exchange held its key rows locked for as long as its connection
    stayed open (hours, without keepalives): every other pod's exchanges and revocations waited on it
    (review of issue 22). Lock waits are bounded, and the server ends a session idle in a transaction."""
    with running_postgres() as server:
        url = server.create_database("gateway")
        settings = standin_settings(standin_url, admin_keys="admin-1", database_url=url)
        async with running_gateway(settings) as (_, http):
            key_id, _ = await new_key(http, rate_limit="600/minute")
            cut_off = Database(url)  # another pod's session, frozen holding the key's row
            connection = cut_off.engine.connect()
            try:
                connection.exec_driver_sql("BEGIN")
                connection.exec_driver_sql("SELECT * FROM api_keys WHERE id = %s FOR UPDATE", (key_id,))
                started = time.monotonic()
                revoked = await http.delete(f"/keys/{key_id}", headers=ADMIN, timeout=60)
                waited = time.monotonic() - started
                assert revoked.status_code == 503 and waited < 20, (revoked.text, waited)
                await asyncio.sleep(16)  # the server ends the session idle in its transaction
                assert (await http.delete(f"/keys/{key_id}", headers=ADMIN)).status_code == 200
            finally:
                with contextlib.suppress(Exception):
                    connection.close()
                cut_off.close()
