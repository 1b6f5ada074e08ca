"""What a worker tells the gateway about itself (its context length and model entry, its request schema
and version), kept in `Worker.facts` and read again when it may have changed.

Facts are read after a probe the worker answered, apart from the health verdict: a fact that cannot
be read (an error, a slow answer, an odd one) never marks a worker down. It keeps what was known
before and is tried again at the next health check. Every fact is read again when the worker comes
back (down, then up: it may be a new process), when it moves (a new address), and every
`interval` seconds (a worker replaced behind a stable address, without ever looking down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.workers.transport import Transport
from service.workers.worker import Worker

log = logging.getLogger(__name__)

# What a worker is asked once it is up; each reader fills `Worker.facts`, or raises and changes nothing.
FactReader = Callable[[Transport, Worker], Awaitable[None]]


def listed_adapters(listing: Any) -> dict[str, str]:
    """The LoRA adapters a worker's `/v1/models` lists (entries with a `parent`): name -> folder."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    return {
        str(entry["id"]): str(entry.get("root") or "")
        for entry in entries or []
        if isinstance(entry, dict) and entry.get("parent") and entry.get("id")
    }


async def read_model_entry(transport: Transport, worker: Worker) -> None:
    """The worker's own `/v1/models` entry (context length, `root`, `parent`, permissions), and the
    adapters it lists."""
    listing = await transport.get_json(worker, "/v1/models")
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        raise ValueError("/v1/models has no `data` list")
    worker.adapters = listed_adapters(listing)
    entry = next((e for e in entries if isinstance(e, dict) and not e.get("parent")), None)
    if entry is None:
        raise ValueError("/v1/models lists no model")
    length = entry.get("max_model_len")
    if isinstance(length, int) and length > 0:
        if worker.max_model_len not in (None, length):
            log.info("worker %s for %s: context %d -> %d tokens", worker.label, worker.model,
                     worker.max_model_len, length)  # fmt: skip
        worker.max_model_len = length
    worker.facts["model_entry"] = entry


DEFAULT_FACT_READERS: tuple[FactReader, ...] = (read_model_entry,)


class FactKeeper:
    """Reads each worker's facts when they are due, and only then."""

    def __init__(self, transport: Transport, readers: Sequence[FactReader], interval: float) -> None:
        self.transport = transport
        self.readers = readers
        self.interval = interval  # seconds after which a fact read successfully is read again

    async def refresh(self, worker: Worker, limit: float) -> None:
        """Run every reader that is due on `worker`, each within `limit` seconds. Never raises: a
        reader that fails is logged (once until it succeeds again) and due again next time."""
        for reader in self.readers:
            name = reader.__name__
            read_at = worker.facts_read.get(name)
            if read_at is not None and time.monotonic() - read_at < self.interval:
                continue
            try:
                async with asyncio.timeout(limit):
                    await reader(self.transport, worker)
            except Exception as exc:
                if name not in worker.facts_failing:
                    log.warning("worker %s for %s: %s failed (%s); trying again at the next check "
                                "(what it said before stays)", worker.label, worker.model, name,
                                describe(exc))  # fmt: skip
                worker.facts_failing.add(name)
                continue
            worker.facts_read[name] = time.monotonic()
            if name in worker.facts_failing:
                worker.facts_failing.discard(name)
                log.info("worker %s for %s: %s succeeded again", worker.label, worker.model, name)


def describe(exc: BaseException) -> str:
    """An exception as one short line for a log."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
