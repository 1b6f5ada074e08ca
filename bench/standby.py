"""What holding a standby share of every known key costs a process (the outage rule of
`service.core.allowances`): the CPU of planning one periodic exchange once every key holds its share (the
steady state, every second), and how many exchanges and how much store time it takes a freshly started
process to be granted every key's share, on SQLite.

    .venv/bin/python -m bench.standby [--keys 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.common import console, save, table
from service.core.key_limits import STANDBY_ASKS, KeyLimits
from service.core.key_policy import KeyPolicy, TokenBudget
from service.core.keys import StoredKey
from service.store import ledger
from service.store.database import Database, default_url
from service.store.schema import api_keys

POLICY = KeyPolicy(rate_limit="600/minute", max_concurrent=4, token_budget=TokenBudget(tokens=1_000_000))


def keys(count: int) -> list[StoredKey]:
    now = datetime.now(UTC)
    return [StoredKey(f"{index:032x}", b"d", "sk-gw-b", f"k{index}", POLICY, now) for index in range(count)]


def store_with(folder: Path, records: list[StoredKey]) -> Database:
    database = Database(default_url(folder))
    database.migrate()
    rows = [{"id": key.id, "digest": key.id * 2, "prefix": key.prefix, "name": key.name, "created_at": key.created_at}
            for key in records]  # fmt: skip
    with database.transaction() as connection:
        connection.execute(api_keys.insert(), rows)
    return database


def exchange(database: Database, limits: KeyLimits) -> tuple[float, float, int]:
    """One exchange as a process makes it: (seconds planning, seconds in the store, standby asks)."""
    started = time.process_time()
    plans = limits.plans()
    planning = time.process_time() - started
    started = time.perf_counter()
    with database.transaction() as connection:
        done = ledger.exchange(
            connection, "bench", int(time.time() * 1000), [p for _, p in plans], lease_ms=30_000
        )
    for (allowance, plan), outcome in zip(plans, done.outcomes, strict=True):
        allowance.applied(plan, outcome)
    return planning, time.perf_counter() - started, sum(plan.standby for _, plan in plans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    records = keys(args.keys)
    clock = [time.time()]
    limits = KeyLimits(lambda _a: None, clock=lambda: clock[0])  # type: ignore[arg-type, return-value]
    limits.prepare(records)
    with tempfile.TemporaryDirectory() as folder:
        database = store_with(Path(folder), records)
        try:
            filling = []
            while True:
                clock[0] += 1.0  # an exchange a second
                planning, storing, asks = exchange(database, limits)
                if not asks:
                    break
                filling.append((planning, storing))
            steady = [exchange(database, limits)[0] for _ in range(20)]
        finally:
            database.close()
    store_seconds = [storing for _, storing in filling]
    rows = [
        ("allowances (3 a key)", len(limits.allowances)),
        (f"exchanges to grant every share ({STANDBY_ASKS} asks each)", len(filling)),
        ("store seconds per such exchange, median", statistics.median(store_seconds)),
        ("CPU ms to plan an exchange, steady, median", 1000 * statistics.median(steady)),
    ]
    table(f"Standby shares of {args.keys:,} keys (SQLite)", ["measure", "value"], rows)
    path = save("standby", {"keys": args.keys, "rows": [[name, value] for name, value in rows]})
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
