"""LoRA adapters onto workers, through vLLM's runtime API (`POST /v1/load_lora_adapter`,
`/v1/unload_lora_adapter`; the worker runs with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).

The gateway loads an adapter onto a replica when a request routed there first needs it, rather than
leaving it to vLLM's filesystem resolver: so it knows when, where and how long each load takes, counts
the loads that fail, checks a folder before accepting it, and routes by what each replica holds.

- One load at a time per worker and adapter: requests that need the same load wait for it.
- A worker that answers that the adapter "has already been loaded" (another gateway process, or pod,
  loaded it) holds it if its `/v1/models` lists it from the same folder. From another folder (an
  adapter removed and registered again under the same name), the folder is replaced only if `may_replace`
  says this target is the name's current registration (the store knows): a request admitted before a
  removal must not put the old weights back under a name registered again since.
- Every load is counted: `gateway_adapter_loads_total{model,adapter,outcome}` and its duration.
- An adapter whose files changed since it was taken in is sent nowhere (`FolderWatch`): a worker that
  dropped it from memory reads its folder again when a request needs it, and vLLM's engine dies of a
  folder it cannot read then (gone, truncated, retrained to a larger rank), with every model and adapter
  of that worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from service.errors import AdapterLoadFailed
from service.ops.lora import UNSERVABLE, FolderFiles, FolderStats, folder_files, folder_stats
from service.ops.metrics import Metrics
from service.workers.facts import listed_adapters
from service.workers.transport import Transport
from service.workers.worker import Worker

log = logging.getLogger(__name__)

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
ALREADY_LOADED = "has already been loaded"  # vLLM's words for a name it holds
WATCH_SECONDS = 1.0  # how long what was seen of an adapter's files holds before they are looked at again
LOOK_TIMEOUT = 2.0  # a look at an adapter's files that takes longer: they count as changed
LOOK_THREADS = 4  # threads looking at adapters' files (a hung look holds one until it returns)


class Outcome(StrEnum):
    """How a load ended (a label of `gateway_adapter_loads_total`)."""

    LOADED = "loaded"
    ALREADY = "already_loaded"  # another gateway process or pod had loaded it
    FAILED = "failed"


@dataclass(frozen=True)
class LoraTarget:
    """An adapter to load: its served name, its folder as the workers see it, and its model."""

    name: str
    path: str
    model: str
    files: FolderFiles = field(default=(), compare=False)  # its files as checked when it was taken in


class FolderWatch:
    """Whether each adapter's files are still the ones checked when it was taken in, looked at off the
    event loop at most once every `every` seconds per adapter (one look at a time): their sizes and
    times first, their content only when those moved. A look that takes longer than `timeout` (a hung
    mount) counts as changed: a worker reading them would hang too."""

    def __init__(self, every: float = WATCH_SECONDS, timeout: float = LOOK_TIMEOUT) -> None:
        self.every = every
        self.timeout = timeout
        self._seen: dict[str, _Seen] = {}
        self._looking: dict[tuple[str, FolderFiles], asyncio.Future[bool]] = {}  # by registration
        # Looks run here, never in the shared pool: a hung one holds one of these threads, nothing else.
        self._executor = ThreadPoolExecutor(LOOK_THREADS, thread_name_prefix="adapter-files")
        # Looks still under way, by registration (a new one is looked at afresh).
        self._hung: dict[tuple[str, FolderFiles], asyncio.Future[tuple[FolderStats, bool]]] = {}

    async def unchanged(self, target: LoraTarget) -> bool:
        """Whether `target`'s files are as recorded (True when nothing was recorded)."""
        if not target.files:
            return True
        if target.files == UNSERVABLE:  # read as nothing a worker can take (gone, a pipe, too large a rank)
            return False
        seen = self._seen.get(target.name)
        current = seen is not None and seen.target == target and seen.target.files == target.files
        if seen is not None and current and time.monotonic() - seen.when < self.every:
            return seen.same
        key = (target.name, target.files)
        looking = self._looking.get(key)
        if looking is None:
            looking = asyncio.ensure_future(self._look(target, seen if current else None))
            self._looking[key] = looking
            looking.add_done_callback(lambda _: self._looking.pop(key, None))
        return await asyncio.shield(looking)

    async def _look(self, target: LoraTarget, seen: _Seen | None) -> bool:
        stats: FolderStats = ()
        same = False
        key = (target.name, target.files)
        hung = self._hung.get(key)
        if hung is None or hung.done():  # else the last look never came back: still changed
            loop = asyncio.get_running_loop()
            look = loop.run_in_executor(self._executor, _compare, target, seen)
            self._hung[key] = look
            try:
                stats, same = await asyncio.wait_for(asyncio.shield(look), self.timeout)
                del self._hung[key]
            except TimeoutError:  # a hung mount: a worker reading the files would hang too
                pass
            except Exception as exc:  # unreadable as a whole: as good as changed
                self._hung.pop(key, None)
                log.warning("adapter %s: its files cannot be looked at (%s)", target.name, exc)
        if not same and (seen is None or seen.same):
            log.warning(
                "adapter %s: its files in %s changed since it was registered, or cannot be read; its "
                "requests are refused until it is registered again", target.name, target.path,
            )  # fmt: skip
        self._seen[target.name] = _Seen(target, time.monotonic(), stats, same)
        return same


@dataclass(frozen=True)
class _Seen:
    target: LoraTarget
    when: float
    stats: FolderStats
    same: bool


def _compare(target: LoraTarget, seen: _Seen | None) -> tuple[FolderStats, bool]:
    """The files' stats now, and whether their content is still the target's (read again only when the
    stats moved since the last look)."""
    folder = Path(target.path)
    stats = folder_stats(folder)
    if seen is not None and stats == seen.stats:
        return stats, seen.same
    return stats, folder_files(folder) == target.files


class AdapterLoads:
    """Loads adapters onto workers, one load per worker and adapter at a time, each counted."""

    def __init__(self, transport: Transport, metrics: Metrics | None = None) -> None:
        self.transport = transport
        self.metrics = metrics
        self._pending: dict[tuple[str, str], asyncio.Future[Outcome]] = {}
        self.watch = FolderWatch()
        # Whether a target may replace the other folder a worker holds under its name (the registry says).
        self.may_replace: Callable[[LoraTarget], Awaitable[bool]] = _never

    @staticmethod
    def holds(worker: Worker, target: LoraTarget) -> bool:
        """Whether `worker` is known to hold `target` (from the same folder)."""
        return worker.adapters.get(target.name) == target.path

    async def ensure(self, worker: Worker, target: LoraTarget) -> Outcome | None:
        """Load `target` onto `worker` unless it holds it already (None then); AdapterLoadFailed if the
        worker cannot. A caller that leaves does not cancel a load others wait for."""
        if self.holds(worker, target):
            return None
        key = (worker.url, target.name)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._counted(worker, target))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    def forget(self, worker: Worker, name: str) -> None:
        """`worker` said it does not hold `name` (restarted, or unloaded by someone else)."""
        worker.adapters.pop(name, None)

    async def unload(self, worker: Worker, name: str) -> bool:
        """Unload `name` from `worker`; whether the worker had it."""
        status, body = await self.transport.post(worker, UNLOAD_PATH, {"lora_name": name})
        worker.adapters.pop(name, None)
        if status not in (200, 404):
            log.warning("worker %s could not unload adapter %s: %s", worker.label, name, message_of(body))
        return status == 200

    async def _counted(self, worker: Worker, target: LoraTarget) -> Outcome:
        started = time.perf_counter()
        outcome = Outcome.FAILED
        try:
            outcome = await self._load(worker, target)
            return outcome
        finally:
            seconds = time.perf_counter() - started
            if self.metrics is not None:
                m = self.metrics
                m.child(m.adapter_loads, target.model, target.name, outcome.value).inc()
                m.child(m.adapter_load_time, target.model, target.name).observe(seconds)
            log.info("adapter %s onto worker %s: %s in %.2f s", target.name, worker.label, outcome.value,
                     seconds)  # fmt: skip

    async def _load(self, worker: Worker, target: LoraTarget) -> Outcome:
        status, body = await self._post_load(worker, target)
        if status == 200:
            worker.adapters[target.name] = target.path
            return Outcome.LOADED
        if status == 400 and ALREADY_LOADED in message_of(body):
            listed = listed_adapters(await self.transport.get_json(worker, "/v1/models"))
            if listed.get(target.name) == target.path:
                worker.adapters[target.name] = target.path
                return Outcome.ALREADY
            if not await self.may_replace(target):  # the worker holds the name's current registration
                raise AdapterLoadFailed(worker.model, target.name, STALE)
            # The name holds another folder's weights (removed and registered again): replace them.
            await self.unload(worker, target.name)
            status, body = await self._post_load(worker, target)
            if status == 200:
                worker.adapters[target.name] = target.path
                return Outcome.LOADED
        reason = load_failure(status, body)
        log.warning("worker %s could not load adapter %s from %s: %s", worker.label, target.name, target.path,
                    reason)  # fmt: skip
        raise AdapterLoadFailed(worker.model, target.name, reason)

    async def _post_load(self, worker: Worker, target: LoraTarget) -> tuple[int, bytes]:
        return await self.transport.post(
            worker, LOAD_PATH, {"lora_name": target.name, "lora_path": target.path}
        )


STALE = (
    "the worker holds another folder under this name, registered since this request was admitted (the "
    "adapter was removed and registered again): send the request again"
)


async def _never(_: LoraTarget) -> bool:
    return False


def message_of(body: bytes) -> str:
    """A worker's answer as one line: its error's message when it sent OpenAI's envelope."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500]
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if parsed.get("detail"):
            return str(parsed["detail"])[:500]
    return str(parsed)[:500]


def load_failure(status: int, body: bytes) -> str:
    """Why a worker did not load an adapter, in words an operator can act on."""
    said = message_of(body)
    if status in (404, 405) and said in ("Not Found", "Method Not Allowed"):
        return (
            "the worker takes no adapters at runtime: start it with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        )
    return f"the worker answered {status}: {said}"
