"""Worker endpoints per model: health checks and choosing where a request goes."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import aiohttp

from service.errors import NoHealthyWorker, Overloaded
from service.settings import ModelKind, ModelSpec

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_SECONDS = 2.0


@dataclass
class Worker:
    """One vLLM OpenAI server: where it is, whether it answers, how busy it is."""

    model: str
    url: str
    healthy: bool = False
    outstanding: int = 0
    max_model_len: int | None = None
    picked: int = 0  # when it was last picked (a pool-wide count), to share load among equals

    @property
    def label(self) -> str:
        """Short stable name for logs and metrics."""
        return self.url.removeprefix("http://").removeprefix("https://")


@dataclass(frozen=True)
class Capacity:
    """How much a model's pool admits: slots per worker, then a bounded FIFO queue."""

    per_worker: int = 16
    queue: int = 64
    queue_timeout: float = 30.0


@dataclass
class ModelPool:
    """A served model, its workers, and the queue of requests waiting for a worker slot."""

    spec: ModelSpec
    workers: list[Worker] = field(default_factory=list)
    capacity: Capacity = field(default_factory=Capacity)
    _waiters: deque[asyncio.Future[Worker]] = field(default_factory=deque)
    _picks: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    @property
    def max_model_len(self) -> int | None:
        """Configured context length, else what a worker reported."""
        if self.spec.max_model_len is not None:
            return self.spec.max_model_len
        return next((w.max_model_len for w in self.workers if w.max_model_len), None)

    @property
    def ready(self) -> bool:
        return any(worker.healthy for worker in self.workers)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def pick(self, exclude: Worker | None = None) -> Worker:
        """The healthy worker with the fewest requests outstanding (ignoring slot limits)."""
        healthy = [worker for worker in self.workers if worker.healthy and worker is not exclude]
        if not healthy:
            raise NoHealthyWorker(self.name)
        return min(healthy, key=lambda worker: (worker.outstanding, worker.picked))

    def _free_worker(self, exclude: Worker | None = None) -> Worker | None:
        worker = self.pick(exclude)
        return worker if worker.outstanding < self.capacity.per_worker else None

    async def acquire(self, exclude: Worker | None = None) -> Worker:
        """A slot on the least busy healthy worker, waiting in line if all are full.

        Raises NoHealthyWorker when none is healthy, Overloaded when the line is full or the wait
        runs out; nothing has been sent upstream then. Pair with `release`.
        """
        worker = self._free_worker(exclude) if not self._waiters else None
        if worker is not None:
            self._take(worker)
            return worker
        if len(self._waiters) >= self.capacity.queue:
            raise Overloaded(self.name, "its queue is full")
        pending: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(pending)
        try:
            await asyncio.wait({pending}, timeout=self.capacity.queue_timeout)
        except BaseException:
            self._forget(pending)
            raise
        if not pending.done():
            self._forget(pending)
            raise Overloaded(self.name, f"no worker slot freed within {self.capacity.queue_timeout:g} s")
        return pending.result()

    def _forget(self, pending: asyncio.Future[Worker]) -> None:
        """Leave the line; a slot handed over meanwhile goes back."""
        if pending in self._waiters:
            self._waiters.remove(pending)
        if pending.done() and not pending.cancelled():
            self.release(pending.result())
        else:
            pending.cancel()

    def release(self, worker: Worker) -> None:
        """The request counted by `acquire` is over: its slot goes to the next in line."""
        worker.outstanding -= 1
        self.hand_over()

    def hand_over(self) -> None:
        """Give free slots to waiting requests, first come first served."""
        while self._waiters:
            try:
                worker = self._free_worker()
            except NoHealthyWorker:
                return
            if worker is None:
                return
            pending = self._waiters.popleft()
            if pending.done():
                continue
            self._take(worker)
            pending.set_result(worker)

    def _take(self, worker: Worker) -> None:
        self._picks += 1
        worker.picked = self._picks
        worker.outstanding += 1


async def check_worker(
    session: aiohttp.ClientSession, worker: Worker, probe_seconds: float = HEALTH_TIMEOUT_SECONDS
) -> bool:
    """Probe a worker's /health; learn its context length the first time it answers."""
    timeout = aiohttp.ClientTimeout(total=probe_seconds)
    try:
        async with session.get(f"{worker.url}/health", timeout=timeout) as response:
            healthy = response.status == 200
        if healthy and worker.max_model_len is None:
            async with session.get(f"{worker.url}/v1/models", timeout=timeout) as models:
                entries = (await models.json(content_type=None)).get("data", [])
            worker.max_model_len = next(
                (e.get("max_model_len") for e in entries if e.get("max_model_len")), None
            )
    except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
        healthy = False
    if healthy != worker.healthy:
        log.info("worker %s for %s is %s", worker.label, worker.model, "up" if healthy else "down")
    worker.healthy = healthy
    return healthy


async def monitor_health(
    session: aiohttp.ClientSession,
    pools: list[ModelPool],
    interval: float,
    probe_seconds: float = HEALTH_TIMEOUT_SECONDS,
) -> None:
    """Check every worker every `interval` seconds, forever (cancel to stop)."""
    while True:
        workers = [worker for pool in pools for worker in pool.workers]
        await asyncio.gather(*(check_worker(session, worker, probe_seconds) for worker in workers))
        for pool in pools:
            pool.hand_over()  # a worker that came back can take waiting requests
        await asyncio.sleep(interval)
