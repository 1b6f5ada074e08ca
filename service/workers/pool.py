"""Worker endpoints per model: health state and choosing where a request goes.

Admission is counted in sequences, not requests: a request costs `prompts x n` slots (capped at one
worker's capacity, so a huge batch waits for a whole worker instead of being refused), so a batch of
1,024 prompts cannot run under the slot of a single request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Collection
from dataclasses import InitVar, dataclass, field
from typing import Any

from service.errors import NoHealthyWorker, Overloaded
from service.ops.settings import ModelKind, ModelSpec

log = logging.getLogger(__name__)


def address_of(url: str) -> str:
    """`host:port` of a worker URL, for logs."""
    return url.removeprefix("http://").removeprefix("https://")


@dataclass(eq=False)
class Worker:
    """One vLLM OpenAI server: where it is, whether it answers, how busy it is, what it told us."""

    model: str
    url: str
    name: str = ""  # stable label for logs and metrics; embedded workers keep theirs across restarts
    up: InitVar[bool] = False
    outstanding: int = 0  # sequences admitted and not yet finished
    max_model_len: int | None = None
    picked: int = 0  # when it was last picked (a pool-wide count), to share load among equals
    failed_checks: int = 0  # consecutive failed health checks
    seen_healthy: bool = False  # healthy at least once since it was (re)started
    facts: dict[str, Any] = field(default_factory=dict)  # what the worker told us (see health.py)
    learned: set[str] = field(default_factory=set)  # which fact readers have succeeded

    def __post_init__(self, up: bool) -> None:
        if not self.name:
            self.name = address_of(self.url)
        self._healthy = up

    @property
    def healthy(self) -> bool:
        """Whether requests may go to it: its last verdict (written only through `mark`)."""
        return self._healthy

    @property
    def label(self) -> str:
        """Short stable name for logs and metrics."""
        return self.name

    def mark(self, healthy: bool) -> None:
        """Record a health verdict (a probe's, or a transport failure's)."""
        if healthy != self._healthy:
            log.info("worker %s for %s is %s", self.label, self.model, "up" if healthy else "down")
        self._healthy = healthy
        self.seen_healthy = self.seen_healthy or healthy


@dataclass(frozen=True)
class Capacity:
    """How much a model's pool admits: sequence slots per worker, then a bounded FIFO queue."""

    per_worker: int = 16
    queue: int = 64
    queue_timeout: float = 30.0


@dataclass(frozen=True, eq=False)
class Lease:
    """Slots held on one worker by one request; give it back with `ModelPool.release`."""

    worker: Worker
    cost: int


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Lease]
    cost: int
    exclude: Collection[Worker]


@dataclass
class ModelPool:
    """A served model, its workers, and the queue of requests waiting for worker slots."""

    spec: ModelSpec
    workers: list[Worker] = field(default_factory=list)
    capacity: Capacity = field(default_factory=Capacity)
    _waiters: deque[_Waiter] = field(default_factory=deque)
    _picks: int = 0
    _context: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    @property
    def max_model_len(self) -> int | None:
        """Configured context length, else what a worker reported (kept once known: every worker of
        a model serves the same model)."""
        if self._context is None:
            self._context = self.spec.max_model_len or next(
                (w.max_model_len for w in self.workers if w.max_model_len), None
            )
        return self._context

    @property
    def ready(self) -> bool:
        return any(worker.healthy for worker in self.workers)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def health_rows(self, hide_addresses: bool = False) -> list[tuple[str, str, bool]]:
        """(model, worker label, healthy) per worker, for the metrics. With `hide_addresses`, a worker
        known only by its address is labelled `<model>-<index>` instead."""
        rows = []
        for index, worker in enumerate(self.workers):
            label = worker.label
            if hide_addresses and label == address_of(worker.url):
                label = f"{self.name}-{index}"
            rows.append((self.name, label, worker.healthy))
        return rows

    def fact(self, key: str) -> Any:
        """Something a worker of this model reported (its schema, version, root), or None. Read from
        the current workers each time: a rolling upgrade brings workers with a newer schema."""
        for worker in self.workers:
            found = worker.facts.get(key)
            if found is not None:
                return found
        return None

    def cost_of(self, sequences: int) -> int:
        """Slots a request of `sequences` sequences takes: all of them, at most one whole worker."""
        return max(1, min(sequences, self.capacity.per_worker))

    def pick(self, exclude: Collection[Worker] = ()) -> Worker:
        """The healthy worker with the fewest sequences outstanding (ignoring slot limits)."""
        healthy = [worker for worker in self.workers if worker.healthy and worker not in exclude]
        if not healthy:
            raise NoHealthyWorker(self.name)
        return min(healthy, key=lambda worker: (worker.outstanding, worker.picked))

    def _free_worker(self, cost: int, exclude: Collection[Worker]) -> Worker | None:
        worker = self.pick(exclude)
        return worker if worker.outstanding + cost <= self.capacity.per_worker else None

    async def acquire(self, sequences: int = 1, exclude: Collection[Worker] = ()) -> Lease:
        """Slots for `sequences` on the least busy healthy worker not in `exclude`, waiting in line
        if none has room.

        Raises NoHealthyWorker when none is healthy, Overloaded when the line is full or the wait
        runs out; nothing has been sent upstream then. Pair with `release`.
        """
        cost = self.cost_of(sequences)
        worker = self._free_worker(cost, exclude) if not self._waiters else None
        if worker is not None:
            return self._take(worker, cost)
        if len(self._waiters) >= self.capacity.queue:
            raise Overloaded(self.name, "its queue is full")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost, exclude)
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=self.capacity.queue_timeout)
        except BaseException:
            self._forget(waiter)
            raise
        if not waiter.future.done():
            self._forget(waiter)
            raise Overloaded(self.name, f"no worker slot freed within {self.capacity.queue_timeout:g} s")
        return waiter.future.result()

    def _forget(self, waiter: _Waiter) -> None:
        """Leave the line; slots handed over meanwhile go back."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        future = waiter.future
        if future.done() and not future.cancelled():
            self.release(future.result())
        else:
            future.cancel()
        self.hand_over()  # the next in line may fit where this one did not

    def release(self, lease: Lease) -> None:
        """The request behind `lease` is over: its slots go to the next in line."""
        lease.worker.outstanding -= lease.cost
        self.hand_over()

    def hand_over(self) -> None:
        """Give free slots to waiting requests, strictly first come first served (a big request at
        the head is not overtaken by small ones behind it, so it cannot starve)."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            try:
                worker = self._free_worker(head.cost, head.exclude)
            except NoHealthyWorker:
                return
            if worker is None:
                return
            self._waiters.popleft()
            head.future.set_result(self._take(worker, head.cost))

    def _take(self, worker: Worker, cost: int) -> Lease:
        self._picks += 1
        worker.picked = self._picks
        worker.outstanding += cost
        return Lease(worker, cost)
