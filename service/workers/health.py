"""Active health checks of every worker, telling a busy worker from a wedged one.

A probe is `GET /health`. Its outcome:
- answered 200: up. Then whatever the worker told us that is due is read again (facts.py), and its
  engine load (`/metrics`, which routing weighs); neither can change the verdict, unless the worker
  refuses the gateway's key there (401/403): then it is down, and says so, until it takes the key.
- refused, unreachable (a fresh connection is not even accepted), or any other answer: down at once.
- no answer in time: slow, which alone is no reason to eject. A slow worker that made progress lately
  (bytes arrived on a request since its last verdict or within the longest probe; or, for a worker
  whose processes are on this host, they used CPU during the probe or wait runnable for it, and none
  is stopped) is busy: it keeps its verdict, is not counted as failing, and its next probe may take
  longer. Without progress it is wedged: down, and a failed check (the supervisor restarts an embedded
  worker after enough of them in a row), except while requests are open on it and its last bytes are
  younger than a stream's idle limit: a worker frozen a while that then goes on keeps its streams.

The probe's time limit counts only time the gateway's own event loop ran: a stall of the gateway (a
blocked loop, a starved process) moves the deadline instead of failing the worker. Each worker is
checked on its own schedule, so a slow probe delays no other worker's check. Any answer at all,
however odd, is a verdict on that worker, never a reason for the monitor to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from service.errors import WorkerAuthFailed
from service.ops.settings import Settings
from service.workers.engine_metrics import read_engine_load
from service.workers.facts import DEFAULT_FACT_READERS, FactKeeper, FactReader, describe, key_refused
from service.workers.http_transport import HttpTransport
from service.workers.pool import ModelPool, Worker
from service.workers.proc_stat import TreeSample, sample_tree
from service.workers.transport import Transport
from service.workers.worker import EngineLoad

__all__ = ["FactReader", "HealthMonitor", "Outcome", "build_monitor", "describe"]

log = logging.getLogger(__name__)

NO_LOAD = EngineLoad()
SLOW_LIMIT_FACTOR = 4.0  # a busy worker's probe may take up to this many times the configured limit
TICK = 0.1  # seconds between looks at the gateway's own loop while a probe is out
GRACE_STEPS = 3  # loop turns given to answers already received before a probe is judged late


class Outcome(Enum):
    UP = "up"
    DOWN = "down"
    SLOW = "slow"


@dataclass(frozen=True)
class Probe:
    """What one probe found: its outcome, how long the worker took (the gateway's stalls left out),
    and why, for the log."""

    outcome: Outcome
    seconds: float
    reason: str = ""


class HealthMonitor:
    """Checks every worker of every pool each `interval` seconds, forever (cancel to stop)."""

    def __init__(
        self,
        transport: Transport,
        pools: Sequence[ModelPool],
        interval: float,
        readers: Sequence[FactReader] = DEFAULT_FACT_READERS,
        engine_load: bool = True,
        *,
        timeout: float = 2.0,
        facts_interval: float = 60.0,
        silence_limit: float = 300.0,
        stream_limit: float = 60.0,
    ) -> None:
        self.transport = transport
        self.pools = pools
        self.interval = interval
        self.timeout = timeout  # a probe's limit; a busy worker's may grow to SLOW_LIMIT_FACTOR times it
        self.facts = FactKeeper(transport, readers, facts_interval)
        self.engine_load = engine_load  # read each worker's /metrics too (only routing needs it)
        # CPU use alone vouches for a worker that answered nothing (probe or byte) for at most this
        # long: a worker spinning without answering is wedged too.
        self.silence_limit = silence_limit
        # Bytes this recent vouch for a slow worker even from before its last check: at least one
        # longest probe and the pause before it, so tokens slower than probes still count.
        self.recent = interval + SLOW_LIMIT_FACTOR * timeout
        # A worker whose bytes are older than `recent` is out of routing; while requests are open on it,
        # its checks count toward a restart only once they are older than this too: the gateway waits
        # that long between a stream's tokens (a worker frozen a while, then going on, keeps them).
        self.stream_limit = stream_limit
        self._checks: dict[Worker, asyncio.Task[None]] = {}
        self._contexts: dict[str, int | None] = {}  # each model's context length, as last logged
        self._reasons: dict[Worker, str] = {}  # why each worker's last check failed
        self._down_since: dict[Worker, float] = {}  # workers whose being down was logged, and since when

    async def run(self) -> None:
        """Every `interval` seconds, a check of each worker whose previous one is over; the first one
        `interval` from now (call `check_all` first for one at once)."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self._start_checks()
        finally:
            checks = list(self._checks.values())
            for task in checks:
                task.cancel()
            await asyncio.gather(*checks, return_exceptions=True)

    async def check_all(self) -> None:
        """Check every worker now (waiting for checks already under way) and return when all are done."""
        self._start_checks()
        await asyncio.gather(*self._checks.values())

    def _start_checks(self) -> None:
        for pool in self.pools:
            for worker in pool.workers:
                if worker not in self._checks:
                    task = asyncio.create_task(self._checked(pool, worker))
                    self._checks[worker] = task
                    task.add_done_callback(partial(self._forget, worker))
        current = {worker for pool in self.pools for worker in pool.workers}
        for gone in [w for w in self._reasons if w not in current]:  # a replica that left (DNS)
            self._reasons.pop(gone, None)
            self._down_since.pop(gone, None)

    def _forget(self, worker: Worker, _: asyncio.Task[None]) -> None:
        self._checks.pop(worker, None)

    async def _checked(self, pool: ModelPool, worker: Worker) -> None:
        try:
            await self.check(worker)
        except Exception:  # a bug here must not end health checking for good
            log.exception("health check of worker %s failed; next one in %g s", worker.label, self.interval)
        pool.hand_over()  # a worker that came back can take waiting requests
        self._log_reachability(pool, worker)
        self._log_context(pool)

    async def check(self, worker: Worker) -> bool:
        """One check: the probe, then the verdict on the worker (see the module docstring); whether it
        is healthy now."""
        timeout = worker.probe_timeout or self.timeout
        probe, before = await self._probe(worker, timeout)
        if probe.outcome is Outcome.UP:
            await self._answered(worker, probe.seconds, timeout)
        elif probe.outcome is Outcome.DOWN:
            self._failed(worker, probe.reason)
        else:
            busy, why = await self._progress(worker, before)
            if busy:
                self._busy(worker, timeout, why)
            else:
                self._failed(worker, f"{probe.reason} and {why}", counts=not self._streams_wait(worker))
        worker.checked_at = time.monotonic()
        return worker.healthy

    async def _answered(self, worker: Worker, seconds: float, limit: float) -> None:
        if not worker.healthy:  # back, or new: it may be another process, with other facts
            worker.facts_read.clear()
        refused = await self.facts.refresh(worker, limit)
        if self.engine_load and refused is None:
            refused = await self._read_load(worker, limit)
        worker.answered_at = time.monotonic()
        wait = min(max(2 * seconds, self.timeout), SLOW_LIMIT_FACTOR * self.timeout)  # twice what it took
        worker.probe_timeout = wait if wait > self.timeout else None
        worker.failed_checks = 0
        if refused is not None:  # it answers, but not to our key: no request could pass. Not counted
            self._refused(worker, refused)  # toward a restart: only the configuration can mend it
            return
        worker.mark(True)

    def _refused(self, worker: Worker, refused: WorkerAuthFailed) -> None:
        reason = key_refused(refused)
        if worker.healthy or worker.down_reason != reason:
            log.warning("worker %s for %s is down: %s", worker.label, worker.model, reason)
        worker.mark(False, reason, refused.status)

    def _busy(self, worker: Worker, timeout: float, progress: str) -> None:
        if worker.probe_timeout is None:
            log.info("worker %s for %s answered no probe within %g s but is busy (%s): kept",
                     worker.label, worker.model, timeout, progress)  # fmt: skip
        worker.probe_timeout = min(2 * timeout, SLOW_LIMIT_FACTOR * self.timeout)
        worker.failed_checks = 0

    def _streams_wait(self, worker: Worker) -> bool:
        """Whether requests are open on the worker and it sent bytes lately enough that the gateway
        still waits on them: a restart would cut them."""
        return worker.outstanding > 0 and time.monotonic() - worker.progress_at < self.stream_limit

    def _failed(self, worker: Worker, reason: str, counts: bool = True) -> None:
        """Out of routing; and, if `counts`, one more failed check toward a restart."""
        self._reasons[worker] = reason
        if worker.healthy:
            note = "" if counts else " (no restart while its streams may still go on)"
            log.warning("worker %s for %s failed its health check: %s%s", worker.label, worker.model,
                        reason, note)  # fmt: skip
            self._down_since.setdefault(worker, time.monotonic())
        worker.probe_timeout = None
        worker.failed_checks += 1 if counts else 0
        worker.mark(False, reason)

    async def _probe(self, worker: Worker, limit: float) -> tuple[Probe, TreeSample | None]:
        """`GET /health` within `limit` seconds of the gateway's own running time. Once it is slow to
        answer (most are not), a fresh connection tells an unreachable worker from a slow one, and a
        look at its processes starts the window in which their CPU use is measured."""
        loop = asyncio.get_running_loop()
        answer = asyncio.ensure_future(self.transport.health(worker))
        extras: list[asyncio.Future[Any]] = []  # [accepts a connection, its processes] once slow

        def slow() -> None:
            extras.append(asyncio.ensure_future(accepts_connection(worker.url)))
            extras.append(asyncio.ensure_future(_sample(worker.pid)))

        started = loop.time()
        try:
            stalled = await _wait_running(answer, limit, SLOW_LIMIT_FACTOR * self.timeout, slow)
            probe = _judge(answer, extras[0] if extras else None, limit, loop.time() - started - stalled)
            before = await extras[1] if extras and probe.outcome is Outcome.SLOW else None
            return probe, before
        finally:
            for task in (answer, *extras):
                task.cancel()
            await asyncio.gather(answer, *extras, return_exceptions=True)

    async def _progress(self, worker: Worker, before: TreeSample | None) -> tuple[bool, str]:
        """Whether a slow worker made progress since its last check, and the evidence (or its lack)."""
        since = time.monotonic() - worker.progress_at
        if worker.progress_at and (worker.progress_at > worker.checked_at or since < self.recent):
            return True, f"bytes arrived on a request {since:.1f} s ago"
        if worker.pid is None or before is None:
            return False, "no bytes arrived lately"
        after = await _sample(worker.pid)
        silent = time.monotonic() - max(worker.answered_at, worker.progress_at)
        if after is None:
            return False, "its process is gone"
        if after.stopped:
            return False, "its processes are stopped"
        if silent > self.silence_limit:
            return False, f"it answered nothing for {silent:.0f} s"
        if after.cpu_ticks > before.cpu_ticks or after.runnable:
            return True, "its processes use CPU or wait for it"
        return False, "its processes use no CPU"

    async def _read_load(self, worker: Worker, limit: float) -> WorkerAuthFailed | None:
        """The engine's own load figures, for routing; a worker without them is still healthy, unless
        it refused the gateway's key (that refusal is returned)."""
        try:
            async with asyncio.timeout(limit):
                await read_engine_load(self.transport, worker)
        except WorkerAuthFailed as refused:
            worker.observe_engine(NO_LOAD)
            return refused
        except Exception as exc:
            if worker.engine != NO_LOAD:
                log.info("worker %s gave no load figures: %s", worker.label, describe(exc))
            worker.observe_engine(NO_LOAD)
        return None

    def _log_reachability(self, pool: ModelPool, worker: Worker) -> None:
        """Say once that a worker is down, with the reason, and once that it answers again. A worker the
        gateway runs itself is expected to be down while it starts (the supervisor says so); a worker
        elsewhere that never answered is said to be down at its first check: a wrong URL shows at once."""
        if worker.healthy:
            since = self._down_since.pop(worker, None)
            if since is not None:
                log.info("worker %s for %s answers again (down %.0f s)", worker.label, worker.model,
                         time.monotonic() - since)  # fmt: skip
            return
        if worker not in self._down_since and not pool.spec.embedded:
            self._down_since[worker] = time.monotonic()
            why = self._reasons.get(worker, "it did not answer")
            log.warning("worker %s for %s cannot be reached: %s; logged again when it answers",
                        worker.label, worker.model, why)  # fmt: skip

    def _log_context(self, pool: ModelPool) -> None:
        """Say once when a model's context length changes (a worker replaced by one with another)."""
        context = pool.max_model_len
        before = self._contexts.get(pool.name)
        if before is not None and context is not None and context != before:
            log.info("model %s: context %d -> %d tokens (from its workers)", pool.name, before, context)
        if context is not None:
            self._contexts[pool.name] = context


def build_monitor(
    settings: Settings,
    probes: aiohttp.ClientSession,
    pools: Sequence[ModelPool],
    readers: Sequence[FactReader] = (),
    engine_load: bool = True,
) -> HealthMonitor:
    """A monitor as `settings` say, probing over `probes` (a session of its own: a probe never waits
    behind traffic). The transport's own limit is only a backstop: the monitor's deadlines decide."""
    backstop = settings.health_timeout * SLOW_LIMIT_FACTOR * 3  # past the longest stalled-probe wait
    transport = HttpTransport(probes, settings.model_copy(update={"health_timeout": backstop}))
    return HealthMonitor(
        transport, pools, settings.health_interval, readers, engine_load,
        timeout=settings.health_timeout,
        facts_interval=settings.worker_facts_interval,
        silence_limit=settings.first_token_timeout,
        stream_limit=settings.idle_token_timeout,
    )  # fmt: skip


async def _wait_running(
    task: asyncio.Future[Any], limit: float, most_stalled: float, slow: Callable[[], None]
) -> float:
    """Wait for `task` until `limit` seconds of the loop's running time have passed (time the loop
    could not run, up to `most_stalled` seconds, does not count), calling `slow` once if it is not
    done after the first look; the seconds not counted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    stalled = 0.0
    first = True
    while not task.done() and (now := loop.time()) < deadline:
        step = min(TICK, deadline - now)
        await asyncio.wait({task}, timeout=step)
        if first and not task.done():
            slow()
        first = False
        late = loop.time() - now - step  # the loop woke us late: it was not running, we were not slow
        if not task.done() and late > 0 and stalled < most_stalled:
            extra = min(late, most_stalled - stalled)
            stalled += extra
            deadline += extra
    for _ in range(GRACE_STEPS):  # an answer that arrived as the deadline passed is still an answer
        if task.done():
            break
        await asyncio.sleep(0)
    return stalled


def _judge(
    answer: asyncio.Future[bool], reach: asyncio.Future[bool] | None, limit: float, seconds: float
) -> Probe:
    """The outcome of a probe from its answer (if any) and whether the worker accepted a connection."""
    if answer.done() and not answer.cancelled():
        error = answer.exception()
        if error is None:
            if answer.result():
                return Probe(Outcome.UP, seconds)
            return Probe(Outcome.DOWN, seconds, "it answered /health with an error")
        if not isinstance(error, TimeoutError):
            return Probe(Outcome.DOWN, seconds, describe(error))
    accepted = (
        reach is not None and reach.done() and not reach.cancelled() and reach.exception() is None
        and reach.result()
    )  # fmt: skip
    if not accepted:
        return Probe(Outcome.DOWN, seconds, f"it accepted no connection within {limit:g} s")
    return Probe(Outcome.SLOW, seconds, f"it answered no probe within {limit:g} s")


async def accepts_connection(url: str) -> bool:
    """Whether the worker's address accepts a TCP connection: the kernel accepts for a process that is
    busy or even stopped, not for one that is gone or a host that cannot be reached."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.open_connection(parts.hostname, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _sample(pid: int | None) -> TreeSample | None:
    """The worker's processes as the kernel sees them now (None without a local process)."""
    return None if pid is None else await asyncio.to_thread(sample_tree, pid)
