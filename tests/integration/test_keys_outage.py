"""Runtime keys while one gateway is cut off from the store that another still reaches (its database made
unreachable for it alone): past its hold it serves no runtime key, limited or not, so a revocation made
elsewhere cannot go unseen for the whole outage; a known key it cannot check is no failed attempt of its
address, an unknown one still is;
usage it served and could not write before it stopped is spooled on its disk and written by the next."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import OperationalError

from service.core import tenants
from service.core.keys import new_secret
from tests.integration.conftest import running_gateway, standin_settings

ADMIN = {"Authorization": "Bearer admin-1"}
STATIC = {"Authorization": "Bearer static-1"}
BODY = {"model": "base", "prompt": "hi", "max_tokens": 4}
LEASE = 2.0  # the shortest allowed: this process holds what it knows for 0.8 x 2 s after its last exchange


def settings_for(url: str, database: Path, **overrides: Any) -> Any:
    return standin_settings(
        url, admin_keys="admin-1", database_url=f"sqlite:///{database}",
        **{"api_keys": "static-1", "keys_sync_interval": 0.1, "keys_lease_seconds": LEASE,
           "keys_store_wait": 0.3, **overrides},
    )  # fmt: skip


@contextlib.contextmanager
def cut_off(app: FastAPI, hanging: bool = False) -> Iterator[None]:
    """This gateway alone cannot reach its database (the others still can) until the block ends: refused
    at once, or (`hanging`) never answering, as behind a stalled connection pooler."""
    database = app.state.database

    async def unreachable(*_: Any) -> Any:
        if hanging:
            await asyncio.Event().wait()
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the database is unreachable"))

    database.run = unreachable
    try:
        yield
    finally:
        del database.run  # the class's own again


async def status_of(http: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, str | None, str | None]:
    answer = await http.post("/v1/completions", json=BODY, headers=headers)
    code = answer.json().get("error", {}).get("code") if answer.status_code != 200 else None
    return answer.status_code, code, answer.headers.get("retry-after")


async def new_key(http: httpx.AsyncClient, **policy: Any) -> tuple[str, dict[str, str]]:
    answer = await http.post("/keys", json={"name": "app", **policy}, headers=ADMIN)
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], {"Authorization": f"Bearer {answer.json()['key']}"}


async def knows(http: httpx.AsyncClient, *keys: dict[str, str]) -> None:
    """Wait until a gateway knows these keys (its exchanges brought them in; a GET of /v1/models is
    not counted in usage)."""
    deadline = asyncio.get_running_loop().time() + 10
    for headers in keys:
        while (await http.get("/v1/models", headers=headers)).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, "the gateway never learnt of the key"
            await asyncio.sleep(0.02)


async def test_a_cut_off_gateway_serves_no_runtime_key_past_its_hold(
    standin_url: str, tmp_path: Path
) -> None:
    settings = settings_for(standin_url, tmp_path / "gateway.db")
    async with running_gateway(settings) as (app, first), running_gateway(settings) as (_, second):
        keys = [await new_key(second), await new_key(second, kinds=["base"]),
                await new_key(second, rate_limit="100000/minute")]  # fmt: skip
        await knows(first, *(headers for _, headers in keys))
        await asyncio.sleep(0.5)  # and its next exchanges their standby shares
        assert [(await status_of(first, headers))[0] for _, headers in keys] == [200] * 3
        with cut_off(app):
            await asyncio.sleep(0.3)  # an exchange already under way ends (it could see the revocations)
            for key_id, _ in keys:
                assert (await second.delete(f"/keys/{key_id}", headers=ADMIN)).status_code == 200
            assert [(await status_of(second, headers))[0] for _, headers in keys] == [401] * 3
            await asyncio.sleep(LEASE)  # past the hold (0.8 of the lease since its last exchange)
            stale = [await status_of(first, headers) for _, headers in keys]
            static = await status_of(first, STATIC)
        await asyncio.sleep(0.5)  # exchanges reach the store again: the revocations are seen
        after = [(await status_of(first, headers))[0] for _, headers in keys]
    assert stale == [(503, "key_uncheckable", "1")] * 3
    assert static[0] == 200  # GATEWAY_API_KEYS need no store
    assert after == [401] * 3


async def test_a_known_key_it_cannot_check_is_no_failed_attempt_and_a_guess_still_is(
    standin_url: str, tmp_path: Path
) -> None:
    """Review of issue 22: a 503 "cannot check now" was a failed attempt (a client retrying its good key
    as Retry-After invites locked its address out); then, fixed too far, no 503 was (guesses during an
    outage went unthrottled, and the answer told a known key from an unknown one)."""
    settings = settings_for(standin_url, tmp_path / "gateway.db", auth_failure_limit=3)
    unknown = {"Authorization": f"Bearer {new_secret()}"}  # shaped like a runtime key: it may be a new one
    async with running_gateway(settings) as (app, http):
        _, known = await new_key(http)
        with cut_off(app):
            await asyncio.sleep(LEASE)  # past its hold: it cannot vouch for the keys it knows
            retried = [await status_of(http, known) for _ in range(6)]
            static = await status_of(http, STATIC)
            mistyped = await status_of(http, {"Authorization": "Bearer static-l"})
            guesses = [(await status_of(http, unknown))[:2] for _ in range(3)]
    assert retried == [(503, "key_uncheckable", "1")] * 6
    assert static[0] == 200  # the same address's good key is not locked out by the retries
    # No key the store makes looks like a mistyped static key: it is refused as such, store or not.
    assert mistyped[:2] == (401, "invalid_api_key")
    assert guesses == [(503, "key_uncheckable")] * 2 + [(429, "too_many_failed_attempts")]


async def test_a_gateway_open_so_far_cut_off_past_its_hold_cannot_tell_whether_keys_are_needed(
    standin_url: str, tmp_path: Path
) -> None:
    """Review of issue 22: a gateway that needed no key stayed open for the whole of its outage, though a
    first key created elsewhere meanwhile closes every gateway on the store. Within its hold it serves as
    before; past it every client request gets 503 (no failed attempt: nobody guessed anything); once the
    store answers it knows again."""
    settings = settings_for(standin_url, tmp_path / "gateway.db", api_keys="", auth_failure_limit=3)
    async with running_gateway(settings) as (app, http):
        with cut_off(app):
            within = await status_of(http, {})
            await asyncio.sleep(LEASE)  # past its hold
            unsure = [await status_of(http, headers) for headers in ({}, STATIC, {}, STATIC, {})]
        await knows_no_key_is_needed(http)
    assert within[0] == 200
    assert unsure == [(503, "key_uncheckable", "1")] * 5  # never 429 too_many_failed_attempts


async def knows_no_key_is_needed(http: httpx.AsyncClient) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while (await status_of(http, {}))[0] != 200:
        assert asyncio.get_running_loop().time() < deadline, "the gateway never answered again"
        await asyncio.sleep(0.05)


async def usage_of(http: httpx.AsyncClient, key_id: str) -> dict[str, int]:
    answer = await http.get("/usage", params={"key": key_id}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    totals: dict[str, int] = answer.json()["totals"]
    return {name: totals[name] for name in ("requests", "tokens_in", "tokens_out")}


@pytest.mark.parametrize("hanging", [False, True], ids=["refused", "hanging"])
async def test_usage_served_in_an_outage_outlives_a_gateway_stopped_before_it_ends(
    standin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hanging: bool
) -> None:
    """A database that never answers (review of issue 22: the stop waited for it for ever, and wrote no
    spool) is given up on as one that refuses."""
    monkeypatch.setattr(tenants, "STOP_RETRY_SECONDS", 0.3)
    settings = settings_for(standin_url, tmp_path / "gateway.db", keys_lease_seconds=30.0,
                            cache_dir=tmp_path / "cache")  # fmt: skip
    (tmp_path / "cache").mkdir()  # a cache folder of its own, with the prepared tokenizers
    (tmp_path / "cache" / "models").symlink_to(standin_settings(standin_url).cache_dir / "models")
    spools = tmp_path / "cache" / "usage-spool"
    served: list[int] = []
    with contextlib.ExitStack() as outage:
        async with running_gateway(settings) as (app, http):
            key_id, headers = await new_key(http)
            served += [(await http.post("/v1/completions", json=BODY, headers=headers)).status_code]
            await asyncio.sleep(0.3)  # written by the next exchanges
            before = await usage_of(http, key_id)
            outage.enter_context(cut_off(app, hanging))
            for _ in range(3):
                served += [(await http.post("/v1/completions", json=BODY, headers=headers)).status_code]
        # The gateway stopped while its database was away.
        copy = b"".join(path.read_bytes() for path in spools.glob("*.json"))
        kept = sorted(spools.glob("*.json"))
    async with running_gateway(settings) as (_, http):
        after = await usage_of(http, key_id)
    assert served == [200] * 4 and before["requests"] == 1
    assert after["requests"] == 4 and after["tokens_in"] == 4 * before["tokens_in"], after
    assert after["tokens_out"] == 4 * before["tokens_out"]
    assert len(kept) == 1 and sorted(spools.glob("*.json")) == []  # written, then deleted
    kept[0].write_bytes(copy)  # as if a gateway had stopped between the store's commit and the deletion
    async with running_gateway(settings) as (_, http):
        again = await usage_of(http, key_id)
    assert again == after  # written twice, counted once


async def test_a_running_gateway_writes_a_spool_once_its_database_is_back(
    standin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenants, "STOP_RETRY_SECONDS", 0.3)
    (tmp_path / "cache").mkdir()  # one host's cache folder, shared by its two gateway processes
    (tmp_path / "cache" / "models").symlink_to(standin_settings(standin_url).cache_dir / "models")
    settings = settings_for(standin_url, tmp_path / "gateway.db", keys_lease_seconds=30.0,
                            cache_dir=tmp_path / "cache")  # fmt: skip
    async with running_gateway(settings) as (staying_app, staying):
        key_id, headers = await new_key(staying)
        with contextlib.ExitStack() as outage:
            async with running_gateway(settings) as (leaving_app, leaving):
                await knows(leaving, headers)
                outage.enter_context(cut_off(staying_app))
                outage.enter_context(cut_off(leaving_app))
                served = [(await leaving.post("/v1/completions", json=BODY, headers=headers)).status_code
                          for _ in range(3)]  # fmt: skip
            spooled = sorted((tmp_path / "cache" / "usage-spool").glob("*.json"))
        await asyncio.sleep(0.5)  # the staying process's exchanges reach the database again
        usage = await usage_of(staying, key_id)
        left = sorted((tmp_path / "cache" / "usage-spool").glob("*.json"))
    assert served == [200] * 3 and len(spooled) == 1
    assert usage["requests"] == 3 and left == []
