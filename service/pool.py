"""Worker endpoints per model: health checks and choosing where a request goes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from service.errors import NoHealthyWorker
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

    @property
    def label(self) -> str:
        """Short stable name for logs and metrics."""
        return self.url.removeprefix("http://").removeprefix("https://")


@dataclass
class ModelPool:
    """A served model and its workers."""

    spec: ModelSpec
    workers: list[Worker] = field(default_factory=list)

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

    def pick(self) -> Worker:
        """The healthy worker with the fewest requests outstanding."""
        healthy = [worker for worker in self.workers if worker.healthy]
        if not healthy:
            raise NoHealthyWorker(self.name)
        return min(healthy, key=lambda worker: worker.outstanding)

    def acquire(self) -> Worker:
        """Pick a worker and count a request against it; pair with `release`."""
        worker = self.pick()
        worker.outstanding += 1
        return worker

    @staticmethod
    def release(worker: Worker) -> None:
        """The request counted by `acquire` is over."""
        worker.outstanding -= 1

    @contextlib.contextmanager
    def lease(self) -> Iterator[Worker]:
        """`acquire` for the duration of a block."""
        worker = self.acquire()
        try:
            yield worker
        finally:
            self.release(worker)


async def check_worker(client: httpx.AsyncClient, worker: Worker) -> bool:
    """Probe a worker's /health; learn its context length the first time it answers."""
    try:
        response = await client.get(f"{worker.url}/health", timeout=HEALTH_TIMEOUT_SECONDS)
        healthy = response.status_code == 200
        if healthy and worker.max_model_len is None:
            models = await client.get(f"{worker.url}/v1/models", timeout=HEALTH_TIMEOUT_SECONDS)
            entries = models.json().get("data", [])
            worker.max_model_len = next(
                (e.get("max_model_len") for e in entries if e.get("max_model_len")), None
            )
    except (httpx.HTTPError, ValueError):
        healthy = False
    if healthy != worker.healthy:
        log.info("worker %s for %s is %s", worker.label, worker.model, "up" if healthy else "down")
    worker.healthy = healthy
    return healthy


async def monitor_health(client: httpx.AsyncClient, pools: list[ModelPool], interval: float) -> None:
    """Check every worker every `interval` seconds, forever (cancel to stop)."""
    while True:
        workers = [worker for pool in pools for worker in pool.workers]
        await asyncio.gather(*(check_worker(client, worker) for worker in workers))
        await asyncio.sleep(interval)
