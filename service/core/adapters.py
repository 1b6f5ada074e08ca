"""The adapters a gateway serves: those of the models file, and those registered at runtime through the
operator API, kept in the store so they survive restarts and every gateway process serves the same set.

- A registration is checked before it is accepted (`adapter_checks.checked`), then really loaded onto
  one healthy replica and made to generate one token there (a worker has answered 200 to a bad folder
  before); only then is it stored (with the topic's revision bumped in the same transaction) and
  served. If anything fails after the load, it is unloaded again.
- Every process reads the "adapters" revision every `poll` seconds (on the store's threads, never on a
  request's path) and, when it moved, the registrations: added ones are served, removed ones are not.
- A removal stops new requests at once (404) in the process that removed it and within a poll in the
  others. Every process then unloads it from the workers once nothing uses it: none of its own
  requests, and none its workers run or hold waiting (their `vllm:lora_requests_info`, which counts
  the requests of every process and pod), read again until then. A request admitted before the removal
  that reaches a worker after the unload loads it again (never a 404): its own process unloads it after.
  Nothing is unloaded while the name is registered again (the store is asked), and a request admitted
  under the old registration never puts the old folder back under the new one (`AdapterLoads.may_replace`).
- Registrations and removals of different names never wait for one another (a load can take seconds);
  a name being registered or removed is busy for any other change until that one ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from service.core.adapter_checks import AdapterRequest, checked, configured, from_row, row_of, served_adapter
from service.core.gateway import Gateway
from service.core.served import CONFIG, RUNTIME, ServedModel
from service.errors import (
    AdapterLoadFailed,
    AdapterNotFound,
    GatewayError,
    InvalidRequest,
    UpstreamRejected,
)
from service.ops.lora import UNSERVABLE
from service.ops.settings import served_name
from service.store import adapters as store
from service.store.database import Database
from service.workers.engine_metrics import read_engine_load
from service.workers.facts import describe, listed_adapters, read_model_entry
from service.workers.lora import LoraTarget
from service.workers.routing import RouteHint
from service.workers.transport import Transport
from service.workers.worker import Worker

log = logging.getLogger(__name__)
IN_USE_POLL = 0.5  # seconds between looks at whether a removed adapter is still in use
RUNNING = 2  # `Worker.affinity` of a replica whose engine runs or queues the adapter now


class AdapterRegistry:
    """The served adapters of one gateway process, kept in line with the store."""

    def __init__(self, gateway: Gateway, database: Database, poll: float = 1.0) -> None:
        self.gateway = gateway
        self.models = gateway.models
        self.database = database
        self.poll = poll
        self._revision: int | None = None
        self._busy: set[str] = set()  # names being registered or removed by this process now
        self._follower: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()
        self._failing = False
        self._warned: set[tuple[str, str]] = set()  # (name, why) a registration is not served, logged

    async def start(self) -> None:
        """Serve the configured adapters and the registered ones (before the first request), then follow
        the store."""
        models = {name: self.models[name] for name in self.gateway.pools if name in self.models}
        for served in await asyncio.to_thread(configured, self.gateway.settings, models):
            self.models.add(served)
        await self.refresh()
        self.gateway.loads.may_replace = self._may_replace
        self._follower = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        tasks = [task for task in (self._follower, *self._unloads) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh(self) -> None:
        """Bring the served set in line with the store, if its revision moved (or while an adapter is
        unservable as its folder was when read: it is read again, in case it is back)."""
        unservable = any(
            m.adapter is not None and m.adapter.files == UNSERVABLE for m in self.models.values()
        )
        known = None if unservable else self._revision
        revision, rows = await self.database.run(store.snapshot, self.database, known)
        if rows is not None:
            await self._apply(rows)
        self._revision = revision

    async def _apply(self, rows: list[store.AdapterRow]) -> None:
        wanted = {row.name: row for row in rows}
        for name, served in list(self.models.items()):
            if served.adapter is not None and served.adapter.source == RUNTIME and name not in wanted:
                self._withdrawn(served)
                log.info("adapter %s is no longer registered", name)
        for row in rows:
            parent = self._parent_for(row)
            if parent is None:
                continue
            current = self.models.get(row.name)
            if current is not None and _same(current, row) and not _unservable(current):
                continue
            served = await asyncio.to_thread(from_row, row, parent)
            if current is not None and _unservable(current) and _unservable(served):
                continue  # its folder is still as it was (read again at each poll until it is back)
            if _unservable(served):
                log.warning("registered adapter %s cannot be served as its folder %s is now (gone, or a rank "
                            "over %d): its requests are refused until it is back", row.name, row.path,
                            parent.spec.lora_max_rank)  # fmt: skip
            self.models.add(served)
            log.info("adapter %s of %s is served (registered)", row.name, row.model)

    def _parent_for(self, row: store.AdapterRow) -> ServedModel | None:
        """The model a stored registration is served on; None (said once in the log) if it cannot be."""
        current = self.models.get(row.name)
        parent = self.models.get(row.model)
        if not _servable_name(row.name):
            why = "its name is no longer one (remove it: DELETE /adapters/NAME)"
        elif current is not None and (current.adapter is None or current.adapter.source == CONFIG):
            why = "its name is configured"
        elif parent is None or parent.adapter is not None or not parent.spec.lora_enabled:
            why = f"no model {row.model} takes adapters"
        else:
            return parent
        if (row.name, why) not in self._warned:
            self._warned.add((row.name, why))
            log.warning("registered adapter %r is not served: %s", row.name, why)
        return None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.refresh()
            except Exception as exc:  # the store down a while: keep serving the last known set
                if not self._failing:
                    log.warning("cannot read the registered adapters (%s); serving the last known set",
                                describe(exc))  # fmt: skip
                self._failing = True
            else:
                if self._failing:
                    log.info("registered adapters read again")
                self._failing = False

    async def register(self, request: AdapterRequest) -> ServedModel:
        """Check, load on one replica, store, serve; a 400 saying why otherwise."""
        parent = self._parent_of(request)
        with self._claimed(request.name):
            if request.name in self.models:
                await self._catch_up()  # removed in another process this second?
            if request.name in self.models:
                raise InvalidRequest(f"name: '{request.name}' is already served (a model or an adapter).",
                                     param="name")  # fmt: skip
            adapter, kind = await asyncio.to_thread(checked, request, parent, self.gateway.settings)
            served = await asyncio.to_thread(served_adapter, parent, adapter, kind)
            worker = await self._try_on_a_replica(served)
            try:
                row = await self.database.run(store.add, self.database, row_of(adapter, kind))
            except store.AdapterExists:
                await self._withdraw(worker, served)
                message = f"name: '{request.name}' was registered meanwhile."
                raise InvalidRequest(message, param="name") from None
            except BaseException:
                await self._unload(worker, served)
                raise
            served = await asyncio.to_thread(from_row, row, parent, adapter.files)
            self.models.add(served)
            log.info("adapter %s of %s registered (%s)", served.name, parent.name, adapter.path)
            return served

    @contextlib.contextmanager
    def _claimed(self, name: str) -> Iterator[None]:
        """`name` is this change's until it ends: another registration or removal of it is a 400."""
        if name in self._busy:
            raise InvalidRequest(f"name: '{name}' is being registered or removed right now; try again "
                                 "once that ends.", param="name")  # fmt: skip
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

    async def _may_replace(self, target: LoraTarget) -> bool:
        """Whether `target` is its name's current registration, so it may replace another folder a worker
        holds under that name: configured so, stored so, or being registered by this process now (its row
        comes once it is checked). With the store away, nothing is replaced."""
        served = self.models.get(target.name)
        if served is not None and served.adapter is not None and served.adapter.source == CONFIG:
            return served.adapter.path == target.path
        try:
            row = await self.database.run(store.find, self.database, target.name)
        except Exception:
            return False
        return row.path == target.path if row is not None else target.name in self._busy

    async def _withdraw(self, worker: Worker, served: ServedModel) -> None:
        """Unload what a registration that lost its name to another process's loaded, unless the worker
        holds the winner's adapter under that name now (the same folder, or the winner's load replaced
        this one): unloading it would cost the winner a reload."""
        assert served.adapter is not None
        with contextlib.suppress(Exception):
            _, rows = await self.database.run(store.snapshot, self.database, None)
            winner = next((row.path for row in rows or [] if row.name == served.name), None)
            listed = listed_adapters(await self.gateway.transport.get_json(worker, "/v1/models"))
            if winner == served.adapter.path or listed.get(served.name) != served.adapter.path:
                return
        await self._unload(worker, served)

    def _parent_of(self, request: AdapterRequest) -> ServedModel:
        parent = self.models.get(request.model)
        if parent is None or parent.adapter is not None:
            known = [name for name, m in self.models.items() if m.adapter is None]
            raise InvalidRequest(f"model: '{request.model}' is not a served model (models: "
                                 f"{', '.join(known)}).", param="model")  # fmt: skip
        if not parent.spec.lora_enabled:
            raise InvalidRequest(
                f"model: '{parent.name}' takes no adapters: set `lora: true` on it in the models file (its "
                "workers then run with LoRA enabled).",
                param="model",
            )
        return parent

    async def _try_on_a_replica(self, served: ServedModel) -> Worker:
        """Load the adapter onto the replica routing would send it to and generate one token with it
        there; unloaded again (and a 400 with the worker's reason) if either fails."""
        assert served.adapter is not None
        worker = served.pool.pick(hint=RouteHint(adapter=served.name))  # NoHealthyWorker: 503
        try:
            await self.gateway.loads.ensure(worker, served.adapter.target)
        except AdapterLoadFailed as exc:
            raise InvalidRequest(f"path: worker {worker.label} could not load the adapter: {exc.reason}.",
                                 param="path") from None  # fmt: skip
        tokenizer = served.tokenizer
        token = next((i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None), 0)
        body = {"model": served.name, "prompt": [token], "max_tokens": 1, "temperature": 0}
        try:
            await self.gateway.transport.complete(worker, "/v1/completions", body)
        except GatewayError as exc:
            await self._unload(worker, served)
            said = exc.message if isinstance(exc, UpstreamRejected) else describe(exc)
            raise InvalidRequest(f"path: worker {worker.label} loaded the adapter but could not generate "
                                 f"with it: {said}", param="path") from None  # fmt: skip
        return worker

    async def remove(self, name: str) -> str:
        """Stop serving a registered adapter (new requests get 404 at once); it is unloaded from the
        workers in the background once nobody uses it. Its served name."""
        with self._claimed(name):
            if name not in self.models:
                await self._catch_up()  # registered in another process this second?
            served = self.models.get(name)
            if served is None and await self._unserved_removed(name):
                return name
            if served is None or served.adapter is None:
                raise AdapterNotFound(name, self.names())
            if served.adapter.source == CONFIG:
                raise InvalidRequest(f"'{name}' is configured in the models file: remove it there (and "
                                     "restart the gateway).", param="name")  # fmt: skip
            known = row_of(served.adapter, served.kind, served.adapter.created_at)
            if not await self.database.run(store.remove, self.database, name, known):
                await self._removed_elsewhere(name)
            self._withdrawn(served)
            log.info("adapter %s removed", name)
            return name

    async def _unserved_removed(self, name: str) -> bool:
        """Remove a stored registration this process does not serve (its name is no longer one, say)."""
        if not any(warned == name for warned, _ in self._warned):
            return False
        removed: bool = await self.database.run(store.remove, self.database, name)
        if removed:
            log.info("registration %r (not served) removed", name)
        return removed

    async def _catch_up(self) -> None:
        """Read the registrations now rather than at the next poll (the store away: as last read)."""
        with contextlib.suppress(Exception):
            await self.refresh()

    async def _removed_elsewhere(self, name: str) -> None:
        """The registration this process serves as `name` was removed in another process since it last
        looked (and maybe registered again): catch up, and say so (never remove a newer registration)."""
        await self.refresh()
        if name in self.models:
            raise InvalidRequest(
                f"name: '{name}' was removed and registered again meanwhile; send the removal again to "
                "remove the new registration.",
                param="name",
            )
        raise AdapterNotFound(name, self.names())

    def _withdrawn(self, served: ServedModel) -> None:
        """No longer served by this process: unloaded in the background once nothing uses it."""
        self.models.remove(served.name)
        task = asyncio.create_task(self._unload_when_unused(served))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload_when_unused(self, served: ServedModel) -> None:
        """Unload a removed adapter from its replicas once no request uses it (see the module's notes);
        not if its name is served again meanwhile. Its metrics series go with it."""
        await asyncio.sleep(2 * self.poll)  # the other processes stop sending it new requests
        deadline = time.monotonic() + self.gateway.settings.read_timeout
        while time.monotonic() < deadline and await self._in_use(served):  # noqa: ASYNC110 (polls the workers)
            await asyncio.sleep(IN_USE_POLL)
        if await self._registered_again(served.name):
            return
        for worker in list(served.pool.workers):
            if worker.healthy or served.name in worker.adapters:
                await self._unload(worker, served)
        if served.usage.requests == 0:  # (a request past the deadline would count into new series)
            self.gateway.metrics.forget_model(served.name)

    async def _registered_again(self, name: str) -> bool:
        """Whether `name` is served again, by this process or (the store says) another one: then the
        workers hold the new registration under it. With the store away, assumed so (never unload what
        may be in use)."""
        if name in self.models or name in self._busy:
            return True
        try:
            return await self.database.run(store.find, self.database, name) is not None
        except Exception:
            return True

    async def _in_use(self, served: ServedModel) -> bool:
        """Whether a request of this process uses the adapter, or a replica runs or queues one (read
        from each replica's metrics now: every process's and pod's requests)."""
        if served.usage.requests > 0:
            return True
        if served.name in self.models:  # served again meanwhile: no unload follows, stop looking
            return False
        workers = [worker for worker in served.pool.workers if worker.healthy]
        limit = self.gateway.settings.health_timeout
        await asyncio.gather(*(_reread(read_engine_load, self.gateway, w, limit) for w in workers))
        return any(worker.affinity(served.name) == RUNNING for worker in workers)

    async def _unload(self, worker: Worker, served: ServedModel) -> None:
        with contextlib.suppress(GatewayError):
            await self.gateway.loads.unload(worker, served.name)

    def names(self) -> list[str]:
        """Every served adapter's name."""
        return [name for name, served in self.models.items() if served.adapter is not None]

    async def listing(self) -> list[dict[str, Any]]:
        """Every adapter with where it is loaded, read from the workers now."""
        pools = {id(m.pool): m.pool for m in self.models.values() if m.adapter is not None}
        workers = [w for pool in pools.values() for w in pool.workers if w.healthy]
        limit = self.gateway.settings.health_timeout
        await asyncio.gather(*(_reread(read_model_entry, self.gateway, w, limit) for w in workers))
        adapters = [m for m in self.models.values() if m.adapter is not None]
        watch = self.gateway.loads.watch
        kept = await asyncio.gather(*(watch.unchanged(m.adapter.target) for m in adapters if m.adapter))
        return [
            {**describe_adapter(m), "files_changed": not same} for m, same in zip(adapters, kept, strict=True)
        ]


async def _reread(
    read: Callable[[Transport, Worker], Awaitable[None]], gateway: Gateway, worker: Worker, limit: float
) -> None:
    """`read` a worker's facts again now (its adapters listed, or its load with the adapters it runs and
    queues); what was known stays if it does not answer in time."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(limit):
            await read(gateway.transport, worker)


def describe_adapter(served: ServedModel, files_changed: bool = False) -> dict[str, Any]:
    """An adapter as GET /adapters shows it (`files_changed`: its requests are refused, 503)."""
    adapter = served.adapter
    assert adapter is not None
    return {
        "name": served.name,
        "model": adapter.model,
        "kind": served.kind.value,
        "source": adapter.source,
        "path": adapter.path,
        "rank": adapter.rank,
        "own_chat_template": adapter.chat_template is not None,
        "description": adapter.description,
        "created_at": adapter.created_at.isoformat() if adapter.created_at else None,
        "loaded_on": holders(served, 1),
        "running_on": holders(served, 2),
        "files_changed": files_changed,
    }


def holders(served: ServedModel, affinity: int) -> list[str]:
    """The replicas of an adapter's pool that hold it (1) or run it now (2)."""
    return [w.label for w in served.pool.workers if w.healthy and w.affinity(served.name) >= affinity]


def _unservable(served: ServedModel) -> bool:
    """Whether an adapter was read as unservable (its folder gone, or over its workers' rank)."""
    return served.adapter is not None and served.adapter.files == UNSERVABLE


def _servable_name(name: str) -> bool:
    """Whether a stored name is still a served name (the rules grew: `unknown` is usage's, for instance)."""
    try:
        served_name(name)
    except ValueError:
        return False
    return True


def _same(current: ServedModel, row: store.AdapterRow) -> bool:
    adapter = current.adapter
    return (
        adapter is not None
        and (adapter.model, adapter.path, current.kind.value) == (row.model, row.path, row.kind)
        and adapter.created_at == row.created_at
    )
