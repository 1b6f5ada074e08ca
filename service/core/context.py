"""What one request carries through the gateway besides its body: its id, the client's side of the
connection (to notice it leaving), who is calling (`service.core.tenancy`) and its record
(observation only, see `service.ops.record`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.types import Receive

from service.core.tenancy import OPEN, Caller
from service.errors import ClientDisconnected
from service.ops.record import RequestRecord

T = TypeVar("T")
# A request still running after this long gets a task watching its client. Shorter ones never need
# one (most non-streamed answers from a fast worker, and every stream's opening); a client leaving
# within it is noticed this much later at most.
WATCH_AFTER_SECONDS = 0.05


@dataclass
class RequestContext:
    request_id: str
    record: RequestRecord
    receive: Receive | None = None  # the client's side; None where nobody can leave (tests)
    session: str | None = None  # the session key header, for `session` routing
    caller: Caller = OPEN  # its API key's id and cache group; OPEN without keys

    async def unless_client_leaves(self, work: Awaitable[T]) -> T:
        """Run `work` in this task; if the client disconnects first, cancel it (leaving the queue,
        dropping a render, closing any worker request so the worker aborts the generation) and raise
        ClientDisconnected. At most one watcher task per request (none for short ones), no second
        task for the work itself."""
        receive = self.receive
        if receive is None:
            return await work
        current = asyncio.current_task()
        assert current is not None
        watchers: list[asyncio.Future[None]] = []

        def watch() -> None:
            watcher = asyncio.ensure_future(_client_gone(receive))
            watcher.add_done_callback(lambda done: None if done.cancelled() else current.cancel())
            watchers.append(watcher)

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, watch)
        try:
            return await work
        except asyncio.CancelledError:
            if not watchers or not watchers[0].done() or watchers[0].cancelled():
                raise  # cancelled from elsewhere (shutdown): not ours to swallow
            current.uncancel()
            self.record.disconnected = True
            raise ClientDisconnected("The client disconnected before the answer was ready.") from None
        finally:
            timer.cancel()
            for watcher in watchers:
                watcher.cancel()


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
