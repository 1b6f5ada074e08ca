"""Active health checks of every worker, and what a worker tells us about itself.

A probe is `GET /health`, then `GET /metrics` for the engine's own load (requests running and waiting,
KV-cache usage, prefix-cache hits), which routing weighs. The first time a worker answers, the gateway
also reads what it needs from it (context length and model entry from `/v1/models`, its version, its
request schema) and keeps it in `Worker.facts`. Any answer at all, however odd, is a verdict on that
worker, never a reason for the monitor to stop: an unexpected exception is logged and the round goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from service.workers.engine_metrics import read_engine_load
from service.workers.pool import ModelPool, Worker
from service.workers.transport import Transport
from service.workers.worker import EngineLoad

log = logging.getLogger(__name__)

NO_LOAD = EngineLoad()

# What a worker is asked once it is up; each reader fills `Worker.facts` (absent on failure).
FactReader = Callable[[Transport, Worker], Awaitable[None]]


async def read_model_entry(transport: Transport, worker: Worker) -> None:
    """The worker's own `/v1/models` entry: context length, `root`, `parent`, permissions."""
    listing = await transport.get_json(worker, "/v1/models")
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        raise ValueError("/v1/models has no `data` list")
    entry = next((e for e in entries if isinstance(e, dict)), None)
    if entry is None:
        raise ValueError("/v1/models lists no model")
    length = entry.get("max_model_len")
    if isinstance(length, int) and length > 0:
        worker.max_model_len = length
    worker.facts["model_entry"] = entry


DEFAULT_FACT_READERS: tuple[FactReader, ...] = (read_model_entry,)


class HealthMonitor:
    """Probes every worker of every pool each `interval` seconds, forever (cancel to stop)."""

    def __init__(
        self,
        transport: Transport,
        pools: Sequence[ModelPool],
        interval: float,
        readers: Sequence[FactReader] = DEFAULT_FACT_READERS,
        engine_load: bool = True,
    ) -> None:
        self.transport = transport
        self.pools = pools
        self.interval = interval
        self.readers = readers
        self.engine_load = engine_load  # read each worker's /metrics too (only routing needs it)

    async def run(self) -> None:
        """A round every `interval` seconds, the first one `interval` from now (call `check_all` first
        for one at once)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # a bug here must not end health checking for good
                log.exception("health check round failed; next round in %g s", self.interval)

    async def check_all(self) -> None:
        workers = [worker for pool in self.pools for worker in pool.workers]
        await asyncio.gather(*(self.check(worker) for worker in workers))
        for pool in self.pools:
            pool.hand_over()  # a worker that came back can take waiting requests

    async def check(self, worker: Worker) -> bool:
        """One probe: the verdict goes on the worker (and its count of consecutive failures). Any
        failure, foreseen or not, is a failed check; the monitor goes on."""
        try:
            healthy = await self.transport.health(worker)
            if healthy:
                await self._learn(worker)
                if self.engine_load:
                    await self._read_load(worker)
        except Exception as exc:
            healthy = False
            if worker.healthy:
                log.warning("worker %s for %s failed its health check: %s", worker.label, worker.model,
                            describe(exc))  # fmt: skip
        worker.failed_checks = 0 if healthy else worker.failed_checks + 1
        worker.mark(healthy)
        return healthy

    async def _read_load(self, worker: Worker) -> None:
        """The engine's own load figures, for routing; a worker without them is still healthy."""
        try:
            await read_engine_load(self.transport, worker)
        except Exception as exc:
            if worker.engine != NO_LOAD:
                log.info("worker %s gave no load figures: %s", worker.label, describe(exc))
            worker.observe_engine(NO_LOAD)

    async def _learn(self, worker: Worker) -> None:
        """Read each fact the worker has not told us yet (once per worker)."""
        for reader in self.readers:
            if reader.__name__ not in worker.learned:
                await reader(self.transport, worker)
                worker.learned.add(reader.__name__)


def describe(exc: BaseException) -> str:
    """An exception as one short line for a log."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
