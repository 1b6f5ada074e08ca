"""Several gateway processes on one port, one of them supervising.

The supervising process binds the port, launches and supervises the embedded workers (and health-checks
them, to restart a wedged one), publishes where they are in a roster file, and starts N serving
processes that inherit the listening socket (the kernel spreads connections over them). Each serving
process is a whole gateway (its own pools, health checks, routing) except that it follows the roster
instead of launching workers. The limits that hold per worker, per model and per key (slots, queue
places, rates, failed key attempts) are counted in a file of shared counters (service.ops.host_counters)
in which each serving process has its own column: what a dead one held is given back before it is
started again. Metrics of all of them are merged through prometheus-client's multiprocess mode (a
shared directory, emptied at start). SIGTERM goes to every serving process, which drains as a single
gateway does; then the workers are stopped. A serving process that dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from prometheus_client import multiprocess

from service.api.app import build_pools
from service.ops.host_counters import HostCounters, layout_for
from service.ops.settings import Settings
from service.workers.health import build_monitor
from service.workers.http_transport import build_session
from service.workers.pool import ModelPool
from service.workers.roster import roster_of, write_roster
from service.workers.supervisor import die_with_parent

log = logging.getLogger(__name__)

MAX_AUTO_PROCESSES = 8
RESPAWN_BACKOFF = (1.0, 30.0)  # first and longest delay before a dead serving process is started again


def available_cores() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup v2 CPU quota if one is set."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def process_count(settings: Settings) -> int:
    """How many processes serve: the setting, or one per core not taken by an embedded worker."""
    if settings.processes:
        return settings.processes
    embedded = sum(spec.replicas for spec in settings.models if spec.embedded)
    return max(1, min(MAX_AUTO_PROCESSES, available_cores() - embedded))


def listening_socket(settings: Settings) -> socket.socket:
    """The gateway's port, bound once here and inherited by every serving process."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """The supervising process: workers, roster, serving processes, signals."""

    def __init__(self, settings: Settings, count: int, sock: socket.socket, folder: Path) -> None:
        self.settings = settings
        self.count = count
        self.sock = sock
        self.roster_path = folder / "roster.json"
        self.counters_path = folder / "counters"
        self.counters = HostCounters.create(self.counters_path, layout_for(settings, count))
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = asyncio.Event()

    def child_env(self, index: int) -> dict[str, str]:
        """Serving process `index`'s environment: the supervisor's, plus where the shared state is."""
        env = dict(os.environ)
        env.update(
            GATEWAY_PROCESSES="1",
            GATEWAY_ROSTER_FILE=str(self.roster_path),
            GATEWAY_SHARED_COUNTERS_FILE=str(self.counters_path),
            GATEWAY_SHARED_COUNTERS_COLUMN=str(index),
            GATEWAY_HOST=self.settings.host,
            GATEWAY_PORT=str(self.sock.getsockname()[1]),
        )
        if self.settings.models_file is not None:
            env["GATEWAY_MODELS_FILE"] = str(self.settings.models_file)
        return env

    def spawn(self, index: int) -> subprocess.Popen[bytes]:
        fd = self.sock.fileno()
        argv = [sys.executable, "-m", "service.api.processes", str(fd)]
        # Its own session, so a terminal's Ctrl-C reaches only this process, which forwards it once.
        env = self.child_env(index)
        return subprocess.Popen(argv, env=env, pass_fds=(fd,), preexec_fn=die_with_parent)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        pools, processes = build_pools(self.settings)
        supervisors = [asyncio.create_task(process.supervise()) for process in processes]
        probes = build_session(self.settings)
        # Checks here only serve supervision (a wedged worker is restarted); the serving processes
        # read the workers' facts and load themselves.
        health = build_monitor(self.settings, probes, list(pools.values()), readers=(), engine_load=False)
        tasks = [asyncio.create_task(health.run()),
                 asyncio.create_task(self._publish(list(pools.values())))]  # fmt: skip
        try:
            await asyncio.sleep(0)  # the roster is written before the first serving process reads it
            await asyncio.gather(*(self._keep_serving(index) for index in range(self.count)))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(process.stop() for process in processes), return_exceptions=True)
            await asyncio.gather(*supervisors, *tasks, return_exceptions=True)
            await probes.close()
            self.counters.close()
            log.info("gateway stopped: %d serving processes, %d workers", self.count, len(processes))

    def _stop(self, sig: int) -> None:
        if self.stopping.is_set():  # a second signal: stop at once
            for child in self.children:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGINT)
            return
        self.stopping.set()
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    async def _publish(self, pools: list[ModelPool]) -> None:
        """Write the roster, and again whenever a worker moves."""
        published = roster_of(pools)
        write_roster(self.roster_path, published)
        while True:
            await asyncio.sleep(0.2)
            roster = roster_of(pools)
            if roster != published:
                write_roster(self.roster_path, roster)
                published = roster

    async def _keep_serving(self, index: int) -> None:
        """One serving process, started again if it dies before the gateway stops."""
        delay = RESPAWN_BACKOFF[0]
        while not self.stopping.is_set():
            child = self.spawn(index)
            self.children.append(child)
            code = await asyncio.to_thread(child.wait)
            self.children.remove(child)
            self.counters.reclaim(index)  # the slots and queue places it held come back
            if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
                multiprocess.mark_process_dead(child.pid)  # type: ignore[no-untyped-call]
            if self.stopping.is_set():
                return
            log.error("serving process %d (pid %d) exited with %s; starting it again in %g s",
                      index, child.pid, code, delay)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, RESPAWN_BACKOFF[1])


def serve_many(settings: Settings, count: int) -> int:
    """Serve with `count` processes until SIGTERM/SIGINT; 0 when stopped by a signal."""
    folder = Path(tempfile.mkdtemp(prefix="llm-gateway-"))
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        clear_metrics_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    else:
        (folder / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder / "metrics")
    sock = listening_socket(settings)
    log.info("serving on http://%s:%d with %d processes", settings.host, sock.getsockname()[1], count)
    try:
        asyncio.run(Supervisor(settings, count, sock, folder).run())
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def clear_metrics_dir(folder: str | Path | None) -> None:
    """Remove an earlier run's metric files from an operator-given multiprocess folder (they would be
    merged into /metrics): the supervising process does this before any serving process starts, and a
    gateway serving alone before it counts anything; a supervisor's serving processes never do."""
    if not folder:
        return
    removed = 0
    for stale in Path(folder).glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    if removed:
        log.info("removed %d metric files of an earlier run from %s", removed, folder)


def _serve_inherited(fd: int) -> int:
    """A serving process: a whole gateway on the inherited socket, following the roster."""
    from service.api.server import serve

    return serve(Settings(), socket.socket(fileno=fd))


if __name__ == "__main__":
    sys.exit(_serve_inherited(int(sys.argv[1])))
