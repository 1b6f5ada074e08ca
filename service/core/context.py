"""What one request carries through the gateway besides its body: its id, the client's side of the
connection (to notice it leaving) and its record (observation only, see `service.ops.record`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.types import Receive

from service.errors import ClientDisconnected
from service.ops.record import RequestRecord

T = TypeVar("T")


@dataclass
class RequestContext:
    request_id: str
    record: RequestRecord | None
    receive: Receive | None = None  # the client's side; None where nobody can leave (tests)

    async def unless_client_leaves(self, work: Awaitable[T]) -> T:
        """Run `work` in this task; if the client disconnects first, cancel it (leaving the queue,
        dropping a render, closing any worker request so the worker aborts the generation) and raise
        ClientDisconnected. One watcher task per request, no second task for the work itself."""
        if self.receive is None:
            return await work
        current = asyncio.current_task()
        assert current is not None
        watcher = asyncio.ensure_future(_client_gone(self.receive))
        watcher.add_done_callback(lambda done: None if done.cancelled() else current.cancel())
        try:
            return await work
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # cancelled from elsewhere (shutdown): not ours to swallow
            current.uncancel()
            if self.record is not None:
                self.record.disconnected = True
            raise ClientDisconnected("The client disconnected before the answer was ready.") from None
        finally:
            watcher.cancel()


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
