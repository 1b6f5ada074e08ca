"""What a key's limits cost: one reservation made in the database (the atomic conditional grant every
request would need if the database held the counters), on SQLite and on PostgreSQL, alone and with other
processes granting on the same key; against the same reservation from the allowance a process holds in
memory (what the gateway does on a request's path), and the periodic exchange that writes usage.

    .venv/bin/python -m bench.ledger [--ops 2000] [--processes 2] [--no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from bench.common import console, percentile, save, table
from service.core.key_limits import Charge, KeyLimits
from service.core.key_policy import KeyPolicy, TokenBudget
from service.core.tenancy import Caller
from service.store import ledger
from service.store.database import Database, default_url
from service.store.ledger import Plan
from service.store.schema import api_keys
from service.store.usage import write_usage

KEY = "b" * 32
LIMIT = 10**15


def prepared(url: str) -> Database:
    """A migrated store with one key."""
    database = Database(url)
    database.migrate()
    with database.transaction() as connection:
        if connection.execute(api_keys.select().where(api_keys.c.id == KEY)).first() is None:
            connection.execute(api_keys.insert().values(
                id=KEY, digest="0" * 64, prefix="sk-gw-b", name="bench", created_at=datetime.now(UTC)))  # fmt: skip
    return database


def grants(url: str, holder: str, ops: int) -> dict[str, list[float]]:
    """`ops` reservations made in the database, one transaction each: latency and this process's CPU."""
    database = prepared(url)
    latencies, cpu = [], []
    held = 0
    try:
        for index in range(ops):
            plan = Plan(KEY, "tokens", LIMIT, 0, held, 0, {0: index}, ask=100, need=100)
            started, started_cpu = time.perf_counter(), time.process_time()
            with database.transaction() as connection:
                held += (
                    ledger.exchange(connection, holder, int(time.time() * 1000), [plan]).outcomes[0].granted
                )
            latencies.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    finally:
        database.close()
    return {"latency": latencies, "cpu": cpu}


def _contender(url: str, holder: str, ops: int, queue: Any) -> None:
    queue.put(grants(url, holder, ops))


def contended(url: str, processes: int, ops: int) -> dict[str, list[float]]:
    """The same, `processes` processes at once on the same key's row."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_contender, args=(url, f"p{index}", ops, queue)) for index in range(processes)
    ]
    for worker in workers:
        worker.start()
    found = [queue.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(60)
    return {name: [x for result in found for x in result[name]] for name in ("latency", "cpu")}


def usage_flush(url: str, keys: int, rounds: int) -> list[float]:
    """Seconds per exchange that writes `keys` usage rows (the periodic one)."""
    database = prepared(url)
    took = []
    try:
        for round_ in range(rounds):
            rows = [{"key_id": f"{index:032x}", "model": "m", "day": date.today(), "holder": "flush",
                     "requests": round_, "errors": 0, "tokens_in": round_ * 10, "tokens_out": round_}
                    for index in range(keys)]  # fmt: skip
            started = time.perf_counter()
            with database.transaction() as connection:
                ledger.exchange(connection, "flush", int(time.time() * 1000), [])
                write_usage(connection, rows)
            took.append(time.perf_counter() - started)
    finally:
        database.close()
    return took


def in_memory(ops: int) -> float:
    """Microseconds of CPU per reservation and settlement from the allowance a process holds."""

    async def ask(_: Any) -> bool:
        raise AssertionError("never asked: the allowance covers every request")

    limits = KeyLimits(ask)
    caller = Caller(KEY, policy=KeyPolicy(token_budget=TokenBudget(tokens=LIMIT)))
    allowance = limits.allowance(KEY, caller.policy, *_tokens())  # type: ignore[arg-type]
    allowance.held = LIMIT

    async def run() -> float:
        started = time.process_time()
        for _ in range(ops):
            charge = Charge(caller, "m", 10, 100)
            await limits.reserve(charge)
            limits.settle(charge, 60)
        return (time.process_time() - started) / ops * 1e6

    return asyncio.run(run())


def _tokens() -> tuple[Any, int]:
    from service.core.allowances import Resource

    return Resource.TOKENS, LIMIT


@contextlib.contextmanager
def backends(postgres: bool) -> Iterator[list[tuple[str, str]]]:
    """(name, URL) of each store to measure."""
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as folder:
        found = [("SQLite", default_url(Path(folder)))]
        if not postgres:
            yield found
            return
        from tests.postgres import running_postgres

        with running_postgres() as server:
            yield [*found, ("PostgreSQL", server.create_database("bench"))]


def summary(samples: dict[str, list[float]]) -> dict[str, float]:
    latency = samples["latency"]
    return {"p50_ms": percentile(latency, 50) * 1e3, "p99_ms": percentile(latency, 99) * 1e3,
            "cpu_us": statistics.mean(samples["cpu"]) * 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--usage-keys", type=int, default=1000)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only (no PostgreSQL installed)")
    args = parser.parse_args()
    results: dict[str, Any] = {"in_memory_cpu_us": in_memory(args.ops * 10)}
    rows = []
    with backends(not args.no_postgres) as stores:
        for name, url in stores:
            alone = summary(grants(url, "alone", args.ops))
            together = summary(contended(url, args.processes, args.ops // 2))
            flush = usage_flush(url, args.usage_keys, 10)
            results[name] = {"alone": alone, f"{args.processes} processes": together,
                             f"usage flush of {args.usage_keys} rows s": statistics.median(flush)}  # fmt: skip
            rows.append([name, alone["p50_ms"], alone["p99_ms"], alone["cpu_us"], together["p50_ms"],
                         together["p99_ms"], statistics.median(flush) * 1e3])  # fmt: skip
    table(
        f"One reservation in the database (ms; CPU µs in the gateway's process); in memory: "
        f"{results['in_memory_cpu_us']:.1f} µs CPU",
        ["store", "alone p50", "alone p99", "CPU/op µs", f"{args.processes} procs p50", f"{args.processes} procs p99",
         f"flush {args.usage_keys} usage rows ms"],
        rows,
    )  # fmt: skip
    console.print(f"wrote {save('ledger', {'ops': args.ops, 'results': results})}")


if __name__ == "__main__":
    main()
