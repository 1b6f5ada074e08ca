"""The allowance ledger on a real SQLite store: grants never let what every process holds plus what was
spent in the window pass the limit; writes are absolute (a retried one counts nothing twice); a lapsed
process's allowance is counted as spent, and it learns so when it comes back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection

from service.store import ledger
from service.store.database import Database, default_url
from service.store.ledger import Plan
from service.store.schema import api_keys

KEY = "k" * 32


@pytest.fixture(name="database")
def store_with_a_key(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite store holding the key KEY."""
    store = Database(default_url(tmp_path))
    store.migrate()
    with store.transaction() as connection:
        connection.execute(api_keys.insert().values(
            id=KEY, digest="0" * 64, prefix="sk-gw-x", name="k", created_at=datetime.now(UTC)))  # fmt: skip
    try:
        yield store
    finally:
        store.close()


def run(
    database: Database, holder: str, plans: list[Plan], now_ms: int = 1000, **kwargs: object
) -> ledger.Exchanged:
    with database.transaction() as connection:
        return ledger.exchange(connection, holder, now_ms, plans, **kwargs)  # type: ignore[arg-type]


def budget(connection: Connection) -> tuple[int, int]:
    """(spent in the window from bucket 7, held) of KEY's tokens."""
    return ledger.statuses(connection, "tokens", {KEY: 7})[KEY]


def ask(amount: int, held: int = 0, spent: dict[int, int] | None = None, limit: int = 100) -> Plan:
    return Plan(KEY, "tokens", limit, 7, held, 0, spent or {}, ask=amount, need=amount)


def test_grants_stop_at_the_limit_whatever_the_holders(database: Database) -> None:
    assert run(database, "a", [ask(60)]).outcomes[0].granted == 60
    refused = run(database, "b", [ask(50)]).outcomes[0]
    assert refused.granted == 0 and refused.used == 0 and refused.held_all == 60
    assert run(database, "b", [ask(40)]).outcomes[0].granted == 40
    # `a` spends 30 of its 60 and gives the other 30 back: 30 free again, and no more.
    run(database, "a", [Plan(KEY, "tokens", 100, 7, 0, 0, {7: 30})])
    granted = run(database, "c", [Plan(KEY, "tokens", 100, 7, 0, 0, {}, ask=50, need=10)]).outcomes[0]
    assert (granted.granted, granted.used, granted.held_all) == (30, 30, 70)
    with database.transaction() as connection:
        assert budget(connection) == (30, 70)


def test_a_retried_write_counts_nothing_twice(database: Database) -> None:
    spend = Plan(KEY, "tokens", 100, 7, 20, 0, {7: 30})
    run(database, "a", [spend])
    run(database, "a", [spend])  # the same totals again: an exchange retried after an unclear failure
    with database.transaction() as connection:
        assert budget(connection) == (30, 20)


def test_spending_outside_the_window_stops_counting(database: Database) -> None:
    run(database, "a", [Plan(KEY, "requests", 10, 0, 0, 0, {3: 6, 5: 4})])
    assert (
        run(database, "b", [Plan(KEY, "requests", 10, 4, 0, 0, {}, ask=1, need=1)]).outcomes[0].granted == 1
    )
    refused = run(database, "b", [Plan(KEY, "requests", 10, 4, 1, 0, {}, ask=6, need=6)]).outcomes[0]
    assert (refused.granted, refused.used, refused.held_all) == (0, 4, 1)
    assert refused.spent_by_bucket == ((5, 4),)  # bucket 3 went with its window


def test_a_lapsed_holder_is_reclaimed_as_spent_and_learns_it(database: Database) -> None:
    run(database, "dead", [ask(70)], now_ms=1_000)
    run(database, "live", [ask(10)], now_ms=40_000, reclaim_lapsed_ms=30_000, bucket_of=lambda _k, _r: 7)
    with database.transaction() as connection:
        assert budget(connection) == (70, 10)  # its 70 count as spent: never over
    back = run(database, "dead", [Plan(KEY, "tokens", 100, 7, 70, 5, {})], now_ms=41_000)
    assert back.reclaimed and back.outcomes[0].held == 5 and back.outcomes[0].change == -65
    assert not run(database, "dead", [Plan(KEY, "tokens", 100, 7, 5, 5, {})], now_ms=42_000).reclaimed


def test_a_stopping_process_gives_everything_back(database: Database) -> None:
    run(database, "a", [ask(80)])
    with database.transaction() as connection:
        ledger.release(connection, "a", 2_000)
        assert budget(connection) == (0, 0)
    assert run(database, "b", [ask(100)]).outcomes[0].granted == 100


def test_a_refused_standby_ask_tells_no_other_process_it_is_wanted(database: Database) -> None:
    run(database, "a", [ask(100)])
    standby = Plan(KEY, "tokens", 100, 7, 0, 0, {}, ask=10, need=1, standby=True)
    assert run(database, "b", [standby]).outcomes[0].granted == 0
    assert not run(database, "a", [], wanted_since_ms=0).contended  # a share ahead is no one's need
    run(database, "b", [ask(10)])  # a request's ask, refused: the others learn the key is wanted
    assert run(database, "a", [], wanted_since_ms=0).contended == {(KEY, "tokens")}


def test_processes_are_counted_by_their_live_leases(database: Database) -> None:
    run(database, "a", [], now_ms=1_000)
    run(database, "b", [], now_ms=20_000)
    assert run(database, "c", [], now_ms=40_000, lease_ms=30_000).processes == 2  # `a` lapsed
    with database.transaction() as connection:
        ledger.release(connection, "b", 41_000)  # stopped: no longer counted
    assert run(database, "c", [], now_ms=42_000, lease_ms=30_000).processes == 1


def test_the_statuses_of_many_keys_are_read_at_once_each_in_its_own_window(database: Database) -> None:
    """GET /keys reads every budget together: each key's spending counts from its own window's bucket."""
    other = "o" * 32
    with database.transaction() as connection:
        connection.execute(api_keys.insert().values(
            id=other, digest="1" * 64, prefix="sk-gw-y", name="o", created_at=datetime.now(UTC)))  # fmt: skip
    run(database, "a", [Plan(KEY, "tokens", 100, 7, 10, 0, {6: 5, 7: 30})])
    spent_elsewhere = Plan(other, "tokens", 100, 2, 8, 0, {6: 9})
    run(database, "b", [Plan(KEY, "tokens", 100, 7, 4, 0, {7: 1}), spent_elsewhere])
    with database.transaction() as connection:
        found = ledger.statuses(connection, "tokens", {KEY: 7, other: 3, "never-used": 7})
    assert found == {KEY: (31, 14), other: (9, 8), "never-used": (0, 0)}
