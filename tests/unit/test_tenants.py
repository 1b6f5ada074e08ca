"""Runtime keys in a process, over a real SQLite store shared by two `Tenants` (two processes' worth):
keys followed within a sync, requests waiting for allowance share one exchange, usage written once
whatever the retries, and everything written and given back on stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.core.key_limits import Charge
from service.core.key_policy import KeyPolicy, TokenBudget
from service.core.keys import StoredKey
from service.core.tenancy import Caller
from service.core.tenants import Tenants
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from service.ops.settings import Settings
from service.store.database import Database, default_url
from service.store.usage import read_usage

BUDGET = KeyPolicy(token_budget=TokenBudget(tokens=10_000))


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Tenants, Tenants]]:
    database = Database(default_url(tmp_path))
    database.migrate()
    settings = Settings(keys_sync_interval=0.05)
    first, second = (Tenants(settings, database, CollectorRegistry()) for _ in range(2))
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()
        database.close()


def answered(prompt: int, completion: int) -> RequestRecord:
    record = RequestRecord(Metrics(lambda: []), "r", "v1_completions")
    record.upstream_started()
    record.upstream_ended()
    record.set_usage({"prompt_tokens": prompt, "completion_tokens": completion})
    record.admit("m")
    return record


def caller_of(key: StoredKey) -> Caller:
    return Caller(key.id, f"key:{key.id}", policy=key.policy)


async def until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not in time")


async def test_a_key_created_or_revoked_in_one_process_is_seen_by_the_other(
    pair: tuple[Tenants, Tenants],
) -> None:
    first, second = pair
    secret, key = await first.create("app", KeyPolicy())
    assert first.find(key.digest) == key  # at once where it was created
    await until(lambda: second.find(key.digest) is not None)  # within a sync elsewhere
    assert secret.startswith("sk-gw-") and key.prefix == secret[:12]
    await first.revoke(key.id)
    await until(lambda: (found := second.find(key.digest)) is not None and found.revoked)


async def test_requests_waiting_for_allowance_share_one_exchange(pair: tuple[Tenants, Tenants]) -> None:
    first, _ = pair
    _, key = await first.create("app", BUDGET)
    calls = 0
    run = first.database.run

    async def counted(work: Any, *args: Any) -> Any:
        nonlocal calls
        if work == first._transaction and any(plan.ask for plan in args[0]):  # not the periodic ones
            calls += 1
        return await run(work, *args)

    first.database.run = counted  # type: ignore[method-assign]
    charges = [Charge(caller_of(key), "m", 10, 200) for _ in range(8)]
    await asyncio.gather(*(first.reserve(charge) for charge in charges))
    assert all(charge.reserved == 200 for charge in charges)
    assert calls == 1, calls


async def test_usage_is_written_once_and_on_stop(tmp_path: Path) -> None:
    database = Database(default_url(tmp_path))
    database.migrate()
    tenants = Tenants(Settings(keys_sync_interval=60, keys_lease_seconds=240), database, CollectorRegistry())
    await tenants.start()
    _, key = await tenants.create("app", BUDGET)
    for _ in range(3):
        charge = Charge(caller_of(key), "m", 10, 100)
        await tenants.reserve(charge)
        record = answered(10, 5)
        tenants.settle(charge, record)
        tenants.finish(key.id, None, record)
    assert await tenants.exchange_soon(full=True)
    assert await tenants.exchange_soon(full=True)  # the same totals again: nothing counted twice
    tenants.finish(key.id, None, answered(0, 0))
    await tenants.stop()  # the last request is written when the process stops
    with database.transaction() as connection:
        [row] = read_usage(connection, key_id=key.id)
        budget_rows = connection.exec_driver_sql("SELECT sum(held) FROM key_allowances").scalar()
    assert (row["requests"], row["errors"], row["tokens_in"], row["tokens_out"]) == (4, 0, 30, 15)
    assert budget_rows == 0  # allowances given back
    database.close()


async def test_a_request_cut_short_is_charged_what_the_gateway_saw(pair: tuple[Tenants, Tenants]) -> None:
    first, _ = pair
    _, key = await first.create("app", BUDGET)
    charge = Charge(caller_of(key), "m", 12, 500)
    await first.reserve(charge)
    record = RequestRecord(Metrics(lambda: []), "r", "v1_completions")
    record.upstream_started()  # a stream that the client left: no usage from the worker
    record.sent = True
    record.tokens_sent(7)
    record.upstream_ended()
    first.settle(charge, record)
    first.settle(charge, record)  # settled once, however many ends it has
    [(_, _, day)] = list(first.usage.totals)
    assert first.usage.totals[(key.id, "m", day)] == [0, 0, 12, 7]
    never_sent = Charge(caller_of(key), "m", 12, 500)
    await first.reserve(never_sent)
    first.settle(never_sent, RequestRecord(Metrics(lambda: []), "r", "v1_completions"))
    assert first.usage.totals[(key.id, "m", day)] == [0, 0, 12, 7]


async def test_an_exchange_with_nothing_to_tell_makes_no_database_call(pair: tuple[Tenants, Tenants]) -> None:
    first, _ = pair
    _, key = await first.create("app", KeyPolicy(max_concurrent=4))
    slot = await first.limits.hold_slot(key)
    await first.exchange_soon(slot)  # the slot granted is what the store records
    first.limits.release_slot(slot)  # just released: kept for the key's next request
    calls = 0
    run = first.database.run

    async def counted(work: Any, *args: Any) -> Any:
        nonlocal calls
        calls += not args[2]  # not the periodic (full) exchanges
        return await run(work, *args)

    first.database.run = counted  # type: ignore[method-assign]
    assert await first.exchange_soon(slot)
    assert calls == 0


async def alone(tmp_path: Path, registry: CollectorRegistry, sync: float) -> tuple[Tenants, StoredKey]:
    """One process's `Tenants` over a store of its own, started, with one key (stop it, close its store)."""
    database = Database(default_url(tmp_path))
    database.migrate()
    tenants = Tenants(Settings(keys_sync_interval=sync), database, registry)
    await tenants.start()
    _, key = await tenants.create("app", BUDGET)
    return tenants, key


async def test_per_key_counters_are_added_in_batches_and_a_scrape_is_never_behind(tmp_path: Path) -> None:
    """The request path only adds to lists; the counters get them at a sync, at a scrape, and on stop."""
    registry = CollectorRegistry()
    tenants, key = await alone(tmp_path, registry, sync=0.05)

    def counted() -> tuple[float, ...]:
        """Requests, errors, tokens in, as the counters hold them (read without a scrape)."""
        metrics = tenants.metrics
        found = {
            (sample.name, sample.labels.get("direction")): sample.value
            for metric in (metrics.requests, metrics.errors, metrics.tokens)
            for family in metric.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["key"] == key.id
        }
        names = [("gateway_key_requests_total", None), ("gateway_key_errors_total", None),
                 ("gateway_key_tokens_total", "in")]  # fmt: skip
        return tuple(found.get(name, 0.0) for name in names)

    def serve(prompt: int, completion: int, error: bool = False) -> None:
        charge = Charge(caller_of(key), "m", prompt, 100)
        record = answered(prompt, completion)
        record.error_type = "server_error" if error else None
        tenants.settle(charge, record)
        tenants.finish(key.id, None, record)

    serve(10, 5)
    serve(4, 1, error=True)
    assert counted() == (0.0, 0.0, 0.0)  # not on the request's path
    assert f'gateway_key_requests_total{{key="{key.id}"}} 2.0' in generate_latest(registry).decode()
    assert counted() == (2.0, 1.0, 14.0)  # the scrape reported them before reading them
    serve(1, 1)
    await until(lambda: counted() == (3.0, 1.0, 15.0), seconds=2.0)  # the next sync reports them
    serve(2, 2)
    await tenants.stop()
    assert counted() == (4.0, 1.0, 17.0)
    tenants.database.close()


async def test_a_revoked_key_s_counts_reach_its_counters_before_its_series_go(tmp_path: Path) -> None:
    """Review of issue 22: a revocation dropped the counts not yet reported; with several processes the
    series stay in their files, so the key's last requests vanished from /metrics."""
    tenants, key = await alone(tmp_path, CollectorRegistry(), sync=5)  # no sync reports them meanwhile
    tenants.finish(key.id, None, answered(3, 4))
    removed: dict[tuple[str, ...], float] = {}
    requests = tenants.metrics.requests
    original = requests.remove

    def remove(*labels: str) -> None:  # what the series held when it went
        removed[labels] = requests.labels(*labels)._value.get()
        original(*labels)

    requests.remove = remove  # type: ignore[method-assign]
    await tenants.revoke(key.id)
    assert removed == {(key.id,): 1.0}
    await tenants.stop()
    tenants.database.close()
