"""Cost of one operation on the limits' counters (service.ops.host_counters): in one process's memory,
on the shared file alone, and on the shared file with other processes hammering the same rows; SQLite
(WAL, synchronous off) doing the same updates as the obvious alternative.

    .venv/bin/python -m bench.counters [--ops 20000] [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import save, table
from service.ops.counters import Window
from service.ops.host_counters import HostCounters, Layout


def per_op(operation: Callable[[], object], ops: int) -> float:
    """Microseconds per call of `operation`."""
    started = time.perf_counter()
    for _ in range(ops):
        operation()
    return (time.perf_counter() - started) / ops * 1e6


def counters_costs(counters: HostCounters, ops: int) -> dict[str, float]:
    """Microseconds per slot take+give pair, per rate-limit hit, per failed-key check."""
    rate = counters.windows("keys", Window(10**9, 60))
    failures = counters.windows("addresses", Window(10, 60))

    def take_give() -> None:
        counters.take("slots/m/w", 1, 10**9)
        counters.give("slots/m/w", 1)

    return {
        "slot take+give": per_op(take_give, ops),
        "rate hit": per_op(lambda: rate.hit("key/abc"), ops),
        "address check": per_op(lambda: failures.check("address/10.0.0.1"), ops),
    }


def sqlite_costs(path: Path, ops: int) -> dict[str, float]:
    """The same updates as SQLite transactions (one row per key and process; a window as bucket rows)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;"
        "CREATE TABLE IF NOT EXISTS held (key TEXT, col INT, n INT, PRIMARY KEY (key, col));"
        "CREATE TABLE IF NOT EXISTS hits (key TEXT, bucket INT, n INT, PRIMARY KEY (key, bucket));"
    )

    def take_give() -> None:
        for delta in (1, -1):
            db.execute("BEGIN IMMEDIATE")
            db.execute("SELECT COALESCE(SUM(n), 0) FROM held WHERE key = 'w'").fetchone()
            db.execute(
                "INSERT INTO held VALUES ('w', 0, ?) ON CONFLICT DO UPDATE SET n = n + ?", (delta, delta)
            )
            db.execute("COMMIT")

    def hit() -> None:
        bucket = int(time.monotonic())
        db.execute("BEGIN IMMEDIATE")
        db.execute("SELECT COALESCE(SUM(n), 0) FROM hits WHERE key = 'k' AND bucket > ?", (bucket - 61,))
        db.execute("INSERT INTO hits VALUES ('k', ?, 1) ON CONFLICT DO UPDATE SET n = n + 1", (bucket,))
        db.execute("COMMIT")

    costs = {"slot take+give": per_op(take_give, ops), "rate hit": per_op(hit, ops)}
    db.close()
    return costs


def hammer(path: Path, column: int, ops: int) -> dict[str, float]:
    return counters_costs(HostCounters.attach(path, column), ops)


def hammer_sqlite(path: Path, ops: int) -> dict[str, float]:
    return sqlite_costs(path, ops)


def at_once(processes: int, work: Callable[..., dict[str, float]], *args: object) -> dict[str, float]:
    """`work(*args)` in `processes` fresh processes at once; the mean of their costs."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        runs = pool.starmap(work, [args] * processes)
    return {name: sum(run[name] for run in runs) / len(runs) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2, help="processes hammering the file at once")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-counters-"))
    layout = Layout(args.processes, 1024, 64, 8192)
    HostCounters.create(folder / "counters", layout)
    results = {
        "in memory (1 process)": counters_costs(HostCounters.in_memory(), args.ops),
        "shared file, alone": counters_costs(HostCounters.attach(folder / "counters", 0), args.ops),
    }
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        runs = pool.starmap(hammer, [(folder / "counters", c, args.ops) for c in range(args.processes)])
    results[f"shared file, {args.processes} processes at once"] = {
        name: sum(run[name] for run in runs) / len(runs) for name in runs[0]
    }
    results["SQLite (WAL, synchronous off), alone"] = sqlite_costs(folder / "counters.db", args.ops)
    results[f"SQLite, {args.processes} processes at once"] = at_once(
        args.processes, hammer_sqlite, folder / "counters.db", args.ops
    )
    names = ["slot take+give", "rate hit", "address check"]
    rows = [
        [where, *(f"{costs[n]:.1f}" if n in costs else "-" for n in names)]
        for where, costs in results.items()
    ]
    table("Microseconds per operation", ["counters", *names], rows)
    save("counters", {"ops": args.ops, "processes": args.processes, "microseconds": results})


if __name__ == "__main__":
    main()
