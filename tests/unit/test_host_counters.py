"""The counters the gateway's processes share: exact under real concurrency (several OS processes on
one file), a dead process's holdings given back, windows that refuse past the limit with a right
Retry-After, bounded tables."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.ops.counters import BUCKETS, Window
from service.ops.host_counters import HostCounters, Layout

SPAWN = multiprocessing.get_context("spawn")  # fresh interpreters, as the gateway's serving processes
PROCESSES = 4


def counters_file(tmp_path: Path, columns: int = PROCESSES) -> tuple[Path, HostCounters]:
    path = tmp_path / "counters"
    return path, HostCounters.create(path, Layout(columns, 64, 16, 64))


def start_together(at: float) -> None:
    """Wait for the common start (spawned interpreters take a while to start, each its own)."""
    time.sleep(max(0.0, at - time.time()))


def hit_many(path: Path, column: int, hits: int, limit: int, at: float) -> int:
    """Hit one key `hits` times; how many were allowed."""
    window = HostCounters.attach(path, column).windows("keys", Window(limit, 3600))
    start_together(at)
    return sum(window.hit("key/shared").allowed for _ in range(hits))


def hold_and_look(path: Path, column: int, seconds: float, cap: int, together: Any) -> int:
    """Take a slot, look at the host-wide total while holding it, give it back; the largest total seen."""
    counters = HostCounters.attach(path, column)
    most = 0
    together.wait()  # every process attached (a loaded machine starts spawned interpreters slowly)
    end = time.time() + seconds
    while time.time() < end:
        if counters.take("slots/m/w", 1, cap):
            most = max(most, counters.held("slots/m/w"))
            counters.give("slots/m/w", 1)
    return most


def take_and_hang(path: Path, column: int, cost: int, ready: Any) -> None:
    """Hold slots, then the row's lock, forever (until killed)."""
    counters = HostCounters.attach(path, column)
    assert counters.take("slots/m/w", cost, 100)
    counters.holdings.locate("slots/m/w", lambda _: False, claim=False)  # its row, locked
    ready.set()
    signal.pause()


def test_a_window_shared_by_processes_admits_exactly_its_limit(tmp_path: Path) -> None:
    path, _ = counters_file(tmp_path)
    with SPAWN.Pool(PROCESSES) as pool:
        at = time.time() + 3
        allowed = pool.starmap(hit_many, [(path, column, 1500, 4000, at) for column in range(PROCESSES)])
    assert sum(allowed) == 4000  # 6,000 attempts, racing on one row: none lost, none over


def test_holdings_never_exceed_the_cap_across_processes(tmp_path: Path) -> None:
    path, supervisor = counters_file(tmp_path)
    with SPAWN.Manager() as manager, SPAWN.Pool(PROCESSES) as pool:
        together = manager.Barrier(PROCESSES)
        most = pool.starmap(hold_and_look, [(path, column, 1.0, 2, together) for column in range(PROCESSES)])
    assert max(most) == 2  # the cap was reached, and never passed
    assert supervisor.held("slots/m/w") == 0


def test_a_killed_process_neither_wedges_the_others_nor_keeps_its_slots(tmp_path: Path) -> None:
    path, supervisor = counters_file(tmp_path)
    ready = SPAWN.Event()
    victim = SPAWN.Process(target=take_and_hang, args=(path, 1, 3, ready))
    victim.start()
    assert ready.wait(30)
    other = HostCounters.attach(path, 0)
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(other.take, "slots/m/w", 98, 100)
        time.sleep(0.3)
        assert not blocked.done()  # the victim holds the row's lock...
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)  # ...and dies inside it: the kernel drops the lock
        assert blocked.result(timeout=5) is False  # its 3 slots still count
    victim.join(10)
    supervisor.reclaim(1)
    assert other.take("slots/m/w", 98, 100) and other.held("slots/m/w") == 98  # given back


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_refuses_past_its_limit_and_retry_after_is_when_it_fits_again() -> None:
    counters = HostCounters.in_memory()
    clock = counters.clock = Clock()
    window = counters.windows("keys", Window(10, 60))
    assert all(window.hit("key/a").allowed for _ in range(10))
    refused = window.hit("key/a")
    assert not refused.allowed and 60 - 1 < refused.retry_after <= 60 + 60 / BUCKETS
    assert window.hit("key/b").allowed  # keys are counted apart
    clock.now += refused.retry_after - 0.01
    assert not window.check("key/a").allowed  # not a moment before
    clock.now += 0.02
    assert window.hit("key/a").allowed


def test_a_window_moves_never_letting_more_than_the_limit_through_any_span() -> None:
    counters = HostCounters.in_memory()
    clock = counters.clock = Clock()
    window = counters.windows("keys", Window(5, 10))
    admitted = []
    for step in range(400):  # a hit every 0.1 s for 40 s
        clock.now = 1000.0 + step * 0.1
        if window.hit("key/a").allowed:
            admitted.append(clock.now)
    assert all(later - earlier >= 10 for earlier, later in zip(admitted, admitted[5:], strict=False))
    assert len(admitted) >= 4 * 5 - 1  # and nearly the whole limit each window


def test_check_counts_nothing_and_a_cost_over_the_limit_never_fits() -> None:
    window = HostCounters.in_memory().windows("addresses", Window(2, 60))
    assert all(window.check("address/x").allowed for _ in range(5))
    assert window.hit("address/x").allowed and window.hit("address/x").allowed
    assert not window.check("address/x").allowed
    assert window.hit("address/y", cost=3).retry_after == float("inf")


def test_rows_whose_window_passed_are_reused_and_a_full_table_evicts_the_lightest() -> None:
    counters = HostCounters.in_memory(address_rows=64)
    clock = counters.clock = Clock()
    window = counters.windows("addresses", Window(1, 60))
    addresses = [f"address/{n}" for n in range(200)]
    assert all(window.hit(address).allowed for address in addresses)
    counted = [address for address in addresses if not window.check(address).allowed]
    assert 32 <= len(counted) <= 64  # at most a row each; the others were evicted by later ones
    clock.now += 61 + 60 / BUCKETS  # every window passed: their rows can be reused
    later = [f"address/later-{n}" for n in range(32)]
    assert all(window.hit(address).allowed for address in later)
    assert not any(window.check(address).allowed for address in later)  # counted in reused rows
    assert all(window.check(address).allowed for address in counted)  # their old hits no longer count


def test_filling_the_address_table_leaves_no_address_free_to_guess() -> None:
    """One failure from each of many addresses fills the table; a new address must still be limited
    (it was admitted without limit when no row was free)."""
    counters = HostCounters.in_memory(address_rows=64)
    window = counters.windows("addresses", Window(10, 60))
    for n in range(1000):
        window.hit(f"address/filler-{n}")
    allowed = [window.hit("address/guesser").allowed for _ in range(40)]
    assert allowed.count(True) == 10 and not window.check("address/guesser").allowed
    for n in range(1000, 2000):  # more filling meanwhile evicts rows that counted less, not the guesser's
        window.hit(f"address/filler-{n}")
    assert not window.check("address/guesser").allowed


def test_give_after_another_key_took_over_a_row_does_not_touch_it() -> None:
    counters = HostCounters.in_memory()
    assert counters.take("slots/m/a", 2, 4)
    counters.give("slots/m/a", 2)  # idle now: another key may take the row over
    assert counters.take("slots/m/b", 1, 4) and counters.held("slots/m/a") == 0
    assert counters.held("slots/m/b") == 1
    counters.give("slots/m/a", 1)  # nothing held under `a`: no effect on `b`
    assert counters.held("slots/m/b") == 1


def test_attaching_checks_the_file_and_the_column(tmp_path: Path) -> None:
    path, _ = counters_file(tmp_path, columns=2)
    with pytest.raises(ValueError, match="column 2"):
        HostCounters.attach(path, 2)
    (tmp_path / "other").write_bytes(bytes(8192))
    with pytest.raises(ValueError):
        HostCounters.attach(tmp_path / "other", 0)


def test_a_check_that_found_no_row_sees_another_process_s_new_count_at_once(tmp_path: Path) -> None:
    """A process remembers the addresses that had no row; a failure counted by another process (which
    claims the address a row) must still refuse there at once, not after the memo ages."""
    path, _ = counters_file(tmp_path, columns=2)
    here = HostCounters.attach(path, 0).windows("addresses", Window(1, 60))
    there = HostCounters.attach(path, 1).windows("addresses", Window(1, 60))
    assert here.check("address/x").allowed and here.check("address/x").allowed  # no row: remembered
    assert there.hit("address/x").allowed  # the other process counts a failure
    assert not here.check("address/x").allowed


def test_a_check_of_an_address_without_a_row_does_not_look_again_until_a_row_is_claimed() -> None:
    """The hot path: a keyed request's address that never failed costs one read, not a table search."""
    counters = HostCounters.in_memory()
    window = counters.windows("addresses", Window(1, 60))
    assert window.check("address/x").allowed
    table = counters.address_windows
    searched: list[bytes] = []
    find = table._find
    table._find = lambda digest, *args: searched.append(digest) or find(digest, *args)  # type: ignore[method-assign]
    assert window.check("address/x").allowed and not searched
    assert window.hit("address/y").allowed  # a row claimed (for another address): look again
    assert window.check("address/x").allowed and len(searched) == 2  # y's claim, then x's look
