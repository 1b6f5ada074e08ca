"""Worker endpoints per model: health state and choosing where a request goes.

Admission is counted in sequences, not requests: a request costs `prompts x n` slots (capped at one
worker's capacity, so a huge batch waits for a whole worker instead of being refused), so a batch of
1,024 prompts cannot run under the slot of a single request.

Slots and queue places are held in `Holdings` (service.ops.counters) shared by the gateway processes
of the host, so the caps hold per worker and per model whatever the process count. The line itself is
per process (strictly first come first served within it); while another process has requests waiting,
new arrivals here join the line instead of taking a freed slot first, and while the line is not empty
it looks for slots freed by other processes every `Capacity.poll` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from service.errors import NoHealthyWorker, Overloaded, WorkersRefuseKey
from service.ops.counters import Holdings
from service.ops.host_counters import HostCounters
from service.ops.metrics import WorkerRow
from service.ops.settings import ModelKind, ModelSpec, RoutingPolicy
from service.workers.fair_line import FairLine
from service.workers.routing import (
    DEFAULT_BLOCK_SIZE,
    NO_HINT,
    Reason,
    RouteHint,
    Router,
    RoutingConfig,
)
from service.workers.worker import Worker, address_of

__all__ = ["Capacity", "Lease", "ModelPool", "Worker", "address_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capacity:
    """How much a model's pool admits: sequence slots per worker, then a bounded FIFO queue."""

    per_worker: int = 16
    queue: int = 64
    queue_timeout: float = 30.0
    poll: float = 0.01  # while requests wait: how often to look for slots other processes freed
    queue_share: float = 1.0  # of the queue's places, the most one API key may hold

    @property
    def per_caller(self) -> int:
        """Queue places one API key may hold."""
        return max(1, int(self.queue * self.queue_share))


@dataclass(frozen=True, eq=False)
class Lease:
    """Slots held on one worker by one request; give it back with `ModelPool.release`."""

    worker: Worker
    cost: int
    reason: Reason = Reason.LEAST_OUTSTANDING  # why this worker (see routing.Reason)
    prefix_tokens: int = 0  # prompt tokens in whole blocks, hashed for prefix routing
    hit_tokens: int = 0  # of which the worker likely had cached (the gateway's estimate)
    slot_key: str = ""  # what the slots are counted under (the worker's name could change meanwhile)


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Lease]
    cost: int
    exclude: Collection[Worker]
    hint: RouteHint

    @property
    def caller(self) -> str | None:
        return self.hint.caller


@dataclass
class ModelPool:
    """A served model, its workers, and the queue of requests waiting for worker slots."""

    spec: ModelSpec
    workers: list[Worker] = field(default_factory=list)
    capacity: Capacity = field(default_factory=Capacity)
    router: Router = field(default_factory=lambda: Router(RoutingConfig()))
    slots: Holdings = field(default_factory=HostCounters.in_memory)  # shared by the host's processes
    _waiters: FairLine[_Waiter] = field(default_factory=FairLine)
    _poller: asyncio.Task[None] | None = None
    _picks: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    @property
    def max_model_len(self) -> int | None:
        """Configured context length, else the smallest its healthy workers report (a request that
        fits it fits each of them), else the smallest any worker reported; None before any did."""
        if self.spec.max_model_len:
            return self.spec.max_model_len
        healthy = [w.max_model_len for w in self.workers if w.healthy and w.max_model_len]
        known = healthy or [w.max_model_len for w in self.workers if w.max_model_len]
        return min(known) if known else None

    @property
    def ready(self) -> bool:
        return any(worker.healthy for worker in self.workers)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def health_rows(self, hide_addresses: bool = False) -> list[WorkerRow]:
        """Each worker's health and engine figures, for the metrics. With `hide_addresses`, a worker
        known only by its address is labelled `<model>-<index>` instead."""
        rows = []
        for index, worker in enumerate(self.workers):
            label = self._label(index, worker, hide_addresses)
            engine = worker.engine
            row = WorkerRow(
                self.name, label, worker.healthy, engine.running, engine.waiting,
                engine.kv_cache_usage, engine.prefix_cache_queries, engine.prefix_cache_hits,
            )  # fmt: skip
            rows.append(row)
        return rows

    def down(self, hide_addresses: bool = False) -> list[dict[str, str]]:
        """Each worker out of routing and why, for /ready (addresses hidden as in `health_rows`)."""
        found = []
        for index, worker in enumerate(self.workers):
            if worker.healthy:
                continue
            label = self._label(index, worker, hide_addresses)
            reason = worker.down_reason or "no health check has passed yet"
            if hide_addresses:
                address = address_of(worker.url)
                reason = reason.replace(address, label).replace(address.rsplit(":", 1)[0], label)
            found.append({"worker": label, "reason": reason})
        return found

    def _label(self, index: int, worker: Worker, hide_addresses: bool) -> str:
        """A worker's label; with `hide_addresses`, one known only by its address is `<model>-<index>`."""
        if hide_addresses and worker.label == address_of(worker.url):
            return f"{self.name}-{index}"
        return worker.label

    def fact(self, key: str) -> Any:
        """Something a worker of this model reported (its schema, version, root), or None. Read from
        the current workers each time, healthy ones first: a rolling upgrade brings workers with a
        newer schema."""
        for worker in sorted(self.workers, key=lambda w: not w.healthy):
            found = worker.facts.get(key)
            if found is not None:
                return found
        return None

    def cost_of(self, sequences: int) -> int:
        """Slots a request of `sequences` sequences takes: all of them, at most one whole worker."""
        return max(1, min(sequences, self.capacity.per_worker))

    @property
    def block_size(self) -> int:
        """Tokens per KV-cache block on this model's workers (what prefix routing hashes in)."""
        for worker in self.workers:
            if worker.engine.block_size:
                return worker.engine.block_size
        return DEFAULT_BLOCK_SIZE

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy in force for the current number of replicas."""
        return self.router.policy_for(len(self.workers))

    def healthy_workers(self, exclude: Collection[Worker] = ()) -> list[Worker]:
        """Workers requests may go to now; raises NoHealthyWorker when there is none."""
        healthy = [worker for worker in self.workers if worker.healthy and worker not in exclude]
        if not healthy:
            raise self.unavailable()
        return healthy

    def unavailable(self) -> NoHealthyWorker:
        """Why a request finds no worker: each refusing the gateway's key is a 502 (the configuration
        is wrong; waiting will not help), anything else the 503 to retry."""
        refused = [worker.refused_status for worker in self.workers]
        if refused and all(refused):
            return WorkersRefuseKey(self.name, next(status for status in refused if status))
        return NoHealthyWorker(self.name)

    def pick(self, exclude: Collection[Worker] = (), hint: RouteHint = NO_HINT, cost: int = 1) -> Worker:
        """The worker the routing policy prefers (ignoring slot limits)."""
        return self.router.route(self.healthy_workers(exclude), cost, hint, self.block_size).order[0]

    def _free_worker(self, cost: int, exclude: Collection[Worker], hint: RouteHint) -> Lease | None:
        """Slots on the most preferred worker with room for `cost`, or None when none has room."""
        healthy = self.healthy_workers(exclude)
        if len(healthy) == 1:  # nothing to choose between (most pools): no routing work at all
            only = healthy[0]
            key = self._take_slots(only, cost)
            return self._take(only, cost, key, Reason.LEAST_OUTSTANDING, 0, 0) if key else None
        block = self.block_size
        route = self.router.route(healthy, cost, hint, block)
        for worker in route.order:
            key = self._take_slots(worker, cost)
            if key:
                hit_blocks = self.router.chosen(route, worker)
                reason = route.reason_for(worker)
                return self._take(worker, cost, key, reason, len(route.blocks) * block, hit_blocks * block)
        return None

    def _take_slots(self, worker: Worker, cost: int) -> str | None:
        """Hold `cost` slots of `worker` for the whole host if it has room; what they are held under."""
        cap = self.capacity.per_worker
        if worker.outstanding + cost > cap:  # this process alone fills it: no need to ask the others
            return None
        key = f"slots/{self.name}/{worker.name}"
        return key if self.slots.take(key, cost, cap) else None

    @property
    def _queue_key(self) -> str:
        return f"queue/{self.name}"

    def _others_waiting(self) -> bool:
        """Whether requests wait in another process's line (new arrivals must not overtake them)."""
        return self.slots.shared and self.slots.held(self._queue_key) > 0

    async def acquire(
        self, sequences: int = 1, exclude: Collection[Worker] = (), hint: RouteHint = NO_HINT
    ) -> Lease:
        """Slots for `sequences` on the healthy worker (not in `exclude`) the routing policy prefers
        among those with room, waiting in line if none has room.

        Raises NoHealthyWorker when none is healthy, Overloaded when the line is full or the wait
        runs out; nothing has been sent upstream then. Pair with `release`.
        """
        cost = self.cost_of(sequences)
        if not self._waiters and not self._others_waiting():
            lease = self._free_worker(cost, exclude, hint)
            if lease is not None:
                return lease
        if not self.slots.take(self._queue_key, 1, self.capacity.queue):
            raise Overloaded(self.name, "its queue is full")
        if hint.caller is not None and not self.slots.take(
            self._caller_key(hint.caller), 1, self.capacity.per_caller
        ):
            self.slots.give(self._queue_key, 1)
            raise Overloaded(self.name, "this API key holds its whole share of the queue")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost, exclude, hint)
        self._waiters.append(waiter)
        self._keep_polling()
        try:
            await asyncio.wait({waiter.future}, timeout=self.capacity.queue_timeout)
        except BaseException:
            self._forget(waiter)
            raise
        if not waiter.future.done():
            self._forget(waiter)
            raise Overloaded(self.name, f"no worker slot freed within {self.capacity.queue_timeout:g} s")
        return waiter.future.result()

    def _caller_key(self, caller: str) -> str:
        return f"queue/{self.name}/{caller}"

    def _leave(self, waiter: _Waiter) -> None:
        """Out of the line (served, cancelled or timed out): its queue places go back."""
        self._waiters.served(waiter)
        self.slots.give(self._queue_key, 1)
        if waiter.caller is not None:
            self.slots.give(self._caller_key(waiter.caller), 1)

    def _forget(self, waiter: _Waiter) -> None:
        """Leave the line; slots handed over meanwhile go back."""
        if waiter in self._waiters:
            self._leave(waiter)
        future = waiter.future
        if future.done() and not future.cancelled():
            self.release(future.result())
        else:
            future.cancel()
        self.hand_over()  # the next in line may fit where this one did not

    def _keep_polling(self) -> None:
        """With other processes sharing the slots, look for slots they free while the line is not empty
        (their releases do not reach this process)."""
        if self.slots.shared and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while self._waiters:
            await asyncio.sleep(self.capacity.poll)
            self.hand_over()

    def release(self, lease: Lease) -> None:
        """The request behind `lease` is over: its slots go to the next in line."""
        lease.worker.outstanding -= lease.cost
        self.slots.give(lease.slot_key, lease.cost)
        self.hand_over()

    def hand_over(self) -> None:
        """Give free slots to waiting requests: API keys take turns, each first come first served within
        its own line (a big request whose turn it is is not overtaken, so it cannot starve)."""
        while self._waiters:
            head = self._waiters.head()
            if head.future.done():
                self._leave(head)
                continue
            try:
                lease = self._free_worker(head.cost, head.exclude, head.hint)
            except NoHealthyWorker:
                return
            if lease is None:
                return
            self._leave(head)
            head.future.set_result(lease)

    def _take(
        self, worker: Worker, cost: int, key: str, reason: Reason, prefix_tokens: int, hit_tokens: int
    ) -> Lease:
        self._picks += 1
        worker.picked = self._picks
        worker.outstanding += cost
        return Lease(worker, cost, reason, prefix_tokens, hit_tokens, key)
