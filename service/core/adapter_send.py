"""The one step of a request that asks for its adapter: before the request goes to the replica routing
chose, that replica must hold the adapter. A replica that answers that it does not know it (it
restarted, or something unloaded it) gets it loaded again and the request once more, so a registered
adapter is never a 404 to the client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from service.errors import AdapterChanged, UpstreamRejected
from service.workers.lora import AdapterLoads, LoraTarget
from service.workers.worker import Worker

log = logging.getLogger(__name__)
T = TypeVar("T")
LOAD_SPAN = "gateway.adapter_load"


class AdapterOnWorker:
    """One request's adapter on the worker it was sent to."""

    def __init__(self, loads: AdapterLoads, target: LoraTarget, worker: Worker) -> None:
        self.loads = loads
        self.target = target
        self.worker = worker

    async def send(
        self, send: Callable[[], Awaitable[T]], span: Callable[[], AbstractContextManager[Any]]
    ) -> T:
        """`send()` once the worker holds the adapter (loaded first, under a `span()`, if need be); once
        more after loading it again if the worker answers 404. Nothing is sent for an adapter whose files
        changed since it was taken in (a worker reading them again could die of it)."""
        if not await self.loads.watch.unchanged(self.target):
            raise AdapterChanged(self.target.name)
        await self._load(span)
        try:
            return await send()
        except UpstreamRejected as exc:
            if exc.status_code != 404:
                raise
            log.info("worker %s no longer holds adapter %s: loading it again", self.worker.label,
                     self.target.name)  # fmt: skip
            self.loads.forget(self.worker, self.target.name)
            await self._load(span)
            return await send()

    async def _load(self, span: Callable[[], AbstractContextManager[Any]]) -> None:
        if self.loads.holds(self.worker, self.target):
            return
        with span() as opened:
            outcome = await self.loads.ensure(self.worker, self.target)
            if opened is not None:
                opened.set_attribute("gateway.adapter", self.target.name)
                opened.set_attribute("gateway.adapter.outcome", outcome.value if outcome else "held")
