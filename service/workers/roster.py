"""The roster file: how the one process that launches embedded workers tells the other gateway
processes on the host where those workers are (each restart takes a fresh port).

It is a small JSON document, `{"<model>": [{"name": ..., "url": ..., "pid": ...}, ...]}`, replaced
atomically (written aside, then renamed) so a reader never sees half of it. The process id (absent
while none runs) lets every process on the host tell a busy worker from a wedged one (health.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.workers.pool import ModelPool
from service.workers.worker import Worker

log = logging.getLogger(__name__)

Roster = dict[str, list[dict[str, Any]]]


def roster_of(pools: Sequence[ModelPool]) -> Roster:
    """Where every embedded worker is now."""
    return {pool.name: [entry_of(worker) for worker in pool.workers] for pool in pools if pool.spec.embedded}


def entry_of(worker: Worker) -> dict[str, Any]:
    """One worker's roster entry."""
    entry: dict[str, Any] = {"name": worker.name, "url": worker.url}
    if worker.pid is not None:
        entry["pid"] = worker.pid
    return entry


def write_roster(path: Path, roster: Roster) -> None:
    """Replace the roster file at once."""
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    aside.write_text(json.dumps(roster))
    aside.replace(path)


def read_roster(path: Path) -> Roster | None:
    """The roster, or None while there is none (or it cannot be read: the last one read stays)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def follow(pool: ModelPool, entries: list[dict[str, Any]]) -> None:
    """Make the pool's workers those of the roster, by name: a worker that moved to a new port is
    the same replica (routing keeps its place), a new process with an empty cache whose facts are
    read again, down until its next check."""
    current = {worker.name: worker for worker in pool.workers}
    workers = []
    for entry in entries:
        name, url = entry["name"], entry["url"]
        pid = entry.get("pid") if isinstance(entry.get("pid"), int) else None
        worker = current.get(name)
        if worker is None:
            worker = Worker(model=pool.name, url=url, name=name)
            log.info("model %s: worker %s at %s", pool.name, name, url)
        elif worker.url != url:
            log.info("model %s: worker %s moved to %s", pool.name, name, url)
            worker.move(url)
        worker.pid = pid
        workers.append(worker)
    pool.workers = workers


def follow_roster(pools: Sequence[ModelPool], path: Path, seen: Roster | None = None) -> Roster | None:
    """Bring the embedded pools in line with the roster file if it changed since `seen`; the roster
    now in force."""
    roster = read_roster(path)
    if roster is None or roster == seen:
        return seen
    for pool in pools:
        if pool.spec.embedded and pool.name in roster:
            follow(pool, roster[pool.name])
            pool.hand_over()
    return roster


async def keep_following(
    pools: Sequence[ModelPool], path: Path, seen: Roster | None, interval: float = 0.25
) -> None:
    """Follow the roster file for the embedded pools, forever (cancel to stop)."""
    while True:
        await asyncio.sleep(interval)
        seen = follow_roster(pools, path, seen)
