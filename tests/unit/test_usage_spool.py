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


def test_a_spool_is_only_its_own_process_s_rows_and_never_lowers_a_total(
    tmp_path: Path, store: Database
) -> None:
    """Review of issue 22: spooled totals overwrote the store's rows of the process they name, so a spool
    naming another process inside, or folded after its process wrote newer totals, took usage away."""
    spool = UsageSpool(tmp_path / "cache", store.url, max_rows=10)
    running, stopped, other = "a" * 32, "b" * 32, "c" * 32
    with store.transaction() as connection:
        write_usage(connection, [row(running, 40)])  # written after the spool below was
    spool.keep(running, [row(running, 1)])
    mixed = spool.keep(other, [row(other, 2), row(running, 1)])
    spool.keep(stopped, [row(stopped, 3)])
    assert spool.fold(store) == 2 and requests_in(store) == 43  # 40 kept, the stopped process's 3 added
    assert not mixed.exists() and mixed.with_name(mixed.name + ".bad").exists()


def test_only_regular_files_are_read_and_none_of_them_holds_up_the_others(
    tmp_path: Path, store: Database
) -> None:
    """Review of issue 22: a pipe named like a spool hung the fold (and the start), a link to /dev/zero
    read until memory ran out and kept every later spool from being written."""
    spool = UsageSpool(tmp_path / "cache", store.url, max_rows=10)
    spool.keep("f" * 32, [row("f" * 32, 2)])  # sorted after the others
    pipe = spool.folder / f"{spool.store}-{'0' * 32}.json"
    os.mkfifo(pipe)
    endless = spool.folder / f"{spool.store}-{'1' * 32}.json"
    endless.symlink_to("/dev/zero")
    folder = spool.folder / f"{spool.store}-{'2' * 32}.json"
    folder.mkdir()
    assert spool.fold(store) == 1 and requests_in(store) == 2
    for path in (pipe, endless, folder):
        assert path.with_name(path.name + ".bad").exists() and not os.path.lexists(path)


def test_spools_of_another_url_are_left_alone_and_said_so(
    tmp_path: Path, store: Database, caplog: pytest.LogCaptureFixture
) -> None:
    ours = UsageSpool(tmp_path / "cache", store.url, max_rows=10)
    other = UsageSpool(tmp_path / "cache", store.url.replace("sqlite:///", "sqlite:////."), max_rows=10)
    kept = other.keep("a" * 32, [row("a" * 32, 2)])
    assert ours.fold(store) == 0 and ours.fold(store) == 0 and kept.exists()
    assert [r.getMessage() for r in caplog.records].count(
        f"1 usage spool(s) in {ours.folder} belong to another database URL: only a gateway started with "
        "that URL writes them"
    ) == 1  # once


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
