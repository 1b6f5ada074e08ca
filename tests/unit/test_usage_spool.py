"""Usage spooled by a process that stopped with its database away: written only to its own store, each file
once committed; a file that is no spool of ours, or whose rows the store refuses, is set aside as `.bad`,
the others still written."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from service.core.usage_spool import STALE_TEMPORARY_SECONDS, UsageSpool
from service.store import ledger
from service.store.database import Database, default_url
from service.store.usage import read_usage, write_usage


def row(holder: str, requests: int) -> dict[str, Any]:
    counts = {"requests": requests, "errors": 0, "tokens_in": 3 * requests, "tokens_out": 5 * requests}
    return {"key_id": "k1", "model": "base", "day": date(2026, 12, 4), "holder": holder, **counts}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Database]:
    database = Database(default_url(tmp_path / "store"))
    database.migrate()
    try:
        yield database
    finally:
        database.close()


def requests_in(database: Database) -> int:
    with database.transaction() as connection:
        return sum(found["requests"] for found in read_usage(connection))


def test_spools_are_written_to_their_own_store_once(tmp_path: Path, store: Database) -> None:
    ours = UsageSpool(tmp_path / "cache", store.url, max_rows=100)
    other = UsageSpool(tmp_path / "cache", "sqlite:////elsewhere/gateway.db", max_rows=100)
    ours.keep("a" * 32, [row("a" * 32, 2)])
    ours.keep("b" * 32, [row("b" * 32, 3)])
    foreign = other.keep("c" * 32, [row("c" * 32, 7)])
    assert ours.fold(store) == 2 and requests_in(store) == 5
    assert sorted(path.name for path in ours.folder.iterdir()) == [foreign.name]  # only the other store's
    ours.keep("a" * 32, [row("a" * 32, 2)])  # folded again (a stop between commit and deletion)
    assert ours.fold(store) == 1 and requests_in(store) == 5


def test_a_file_that_cannot_be_written_is_set_aside_and_the_others_are_written(
    tmp_path: Path, store: Database
) -> None:
    spool = UsageSpool(tmp_path / "cache", store.url, max_rows=1)
    spool.keep("a" * 32, [row("a" * 32, 2)])
    broken = spool.folder / f"{spool.store}-{'b' * 32}.json"
    broken.write_text('{"rows": [{"key_id": "k1", "requests": -4}]}')
    huge = spool.folder / f"{spool.store}-{'c' * 32}.json"
    huge.write_text('{"rows": []}' + " " * 2048)  # larger than a spool of at most one row can be
    poison = spool.folder / f"{spool.store}-{'0' * 32}.json"  # sorted first; the store refuses its count
    poison.write_text(
        '{"rows": [{"key_id": "k1", "model": "base", "day": "2026-12-04", "holder": "' + "0" * 32 + '", '
        '"requests": 1, "errors": 0, "tokens_in": 9223372036854775808, "tokens_out": 0}]}'
    )
    assert spool.fold(store) == 1 and requests_in(store) == 2  # the good one is written all the same
    for path in (broken, huge, poison):  # set aside once, never read again
        assert not path.exists() and path.with_name(path.name + ".bad").exists()
    assert spool.fold(store) == 0


def test_a_spool_is_only_its_own_stopped_process_s_rows(tmp_path: Path, store: Database) -> None:
    """Spooled totals overwrite the store's rows of the same process: never those of another process named
    inside the file, nor of a process that renewed its lease after the file was written (it is running)."""
    spool = UsageSpool(tmp_path / "cache", store.url, max_rows=10)
    running, stopped, other = "a" * 32, "b" * 32, "c" * 32
    with store.transaction() as connection:
        write_usage(connection, [row(running, 40)])
        ledger.exchange(connection, stopped, 1_000, [])  # its last lease renewal: long before its spool
    stale = spool.keep(running, [row(running, 1)])
    mixed = spool.keep(other, [row(other, 2), row(running, 1)])
    spool.keep(stopped, [row(stopped, 3)])
    with store.transaction() as connection:  # the running process exchanges after its file was written
        ledger.exchange(connection, running, int(stale.stat().st_mtime * 1000) + 5_000, [])
    assert spool.fold(store) == 1 and requests_in(store) == 43  # the stopped process's 3 only
    for path in (stale, mixed):
        assert not path.exists() and path.with_name(path.name + ".bad").exists()


def test_temporary_files_of_spools_never_finished_are_swept(tmp_path: Path, store: Database) -> None:
    spool = UsageSpool(tmp_path / "cache", store.url, max_rows=10)
    spool.folder.mkdir(parents=True)
    debris = spool.folder / f"{spool.store}-{'a' * 32}.json.4242.tmp"
    writing = spool.folder / f"{spool.store}-{'b' * 32}.json.4343.tmp"
    for path in (debris, writing):
        path.write_text('{"rows": [')
    long_ago = time.time() - STALE_TEMPORARY_SECONDS - 60
    os.utime(debris, (long_ago, long_ago))
    assert spool.fold(store) == 0
    assert not debris.exists() and writing.exists()  # one being written now is left to its writer
