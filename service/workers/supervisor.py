"""Embedded mode: launch one vLLM OpenAI server process per model replica, restart it when it dies
or wedges (with exponential backoff), and stop every child on shutdown.

Each worker runs in its own session (process group) so stopping it reaches vLLM's engine process
too, and asks the kernel to SIGTERM it if the gateway itself dies, so nothing is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from service.ops.settings import ModelSpec, Settings
from service.ops.tracing import endpoint_from_env, protocol
from service.workers.worker import Worker
from service.workers.worker_guard import guard_launch
from service.workers.worker_log import WorkerLog, log_tail

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
STABLE_RUN_SECONDS = 120.0  # a worker up this long resets the restart backoff
PR_SET_PDEATHSIG = 1
# What the gateway itself asks every worker (health, engine load, the facts it reads again): left out
# of the worker's access log, where these probes were nine lines in ten and hid the requests.
PROBE_PATHS = ("/health", "/metrics", "/v1/models", "/openapi.json", "/version")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one worker process."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path


def free_port(host: str) -> int:
    """A port the OS says is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def plan_core_binding(workers: int, cores: list[int]) -> list[str | None]:
    """VLLM_CPU_OMP_THREADS_BIND per worker: disjoint core sets when there are enough cores.

    One worker alone is left to vLLM's own choice (it keeps a core for its front end). Several
    workers split the cores so their OpenMP threads don't fight; with more workers than cores they
    share round-robin, one core each.
    """
    if workers <= 1 or not cores:
        return [None] * workers
    if workers > len(cores):
        return [str(cores[i % len(cores)]) for i in range(workers)]
    share, extra = divmod(len(cores), workers)
    plan: list[str | None] = []
    start = 0
    for index in range(workers):
        size = share + (1 if index < extra else 0)
        plan.append(",".join(str(core) for core in cores[start : start + size]))
        start += size
    return plan


def launch_plan(
    spec: ModelSpec, settings: Settings, port: int, cores: str | None, replica: int
) -> LaunchPlan:
    """Command line and environment of one embedded vLLM worker."""
    source = settings.resolve_source(spec.source or "")
    argv = [
        settings.engine_python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", source,
        "--served-model-name", spec.name,
        "--host", settings.worker_host,
        "--port", str(port),
        "--dtype", spec.dtype,
    ]  # fmt: skip
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    if spec.chat_template is not None:  # the worker renders chats with the gateway's template
        argv += ["--chat-template", str(spec.chat_template)]
    if spec.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser]
    if spec.reasoning_parser:
        argv += ["--reasoning-parser", spec.reasoning_parser]
    if spec.trust_request_chat_template:
        argv.append("--trust-request-chat-template")
    argv += ["--disable-access-log-for-endpoints", ",".join(PROBE_PATHS)]  # engine_args may override it
    argv += lora_args(spec)
    argv += spec.engine_args
    env = dict(os.environ)
    # The gateway's multiprocess metrics folder is its own: a worker writing there would mix its
    # metrics with the gateway's and every other worker's.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=str(settings.worker_kv_cache_gib),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if Path(source).is_dir():
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    traces = endpoint_from_env(env)
    if traces:  # the gateway traces: the worker exports its spans to the same place
        argv += ["--otlp-traces-endpoint", traces]
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = protocol(env)
        env["OTEL_SERVICE_NAME"] = f"vllm {spec.name}"
    if settings.worker_api_key:  # vLLM's --api-key, by environment: not on a command line all can read
        env["VLLM_API_KEY"] = settings.worker_api_key.get_secret_value()
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    if spec.lora_enabled:  # the gateway loads adapters through vLLM's runtime API (see workers/lora.py)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.update(spec.engine_env)
    if settings.worker_api_key:  # vLLM's key guards only /v1 and a few more: the guard, every route
        guard_launch(argv, env, settings.cache_dir / "worker-guard")
    log_path = settings.cache_dir / "logs" / f"{spec.name.replace('/', '_')}-{replica}.log"
    return LaunchPlan(argv=argv, env=env, log_path=log_path)


def lora_args(spec: ModelSpec) -> list[str]:
    """vLLM's LoRA flags for a model that serves adapters (none otherwise). An adapter may bring its own
    chat template, which the gateway sends with each of its chat requests: the worker must take it."""
    if not spec.lora_enabled:
        return []
    batch, kept = spec.lora_slots
    argv = ["--enable-lora", "--max-loras", str(batch), "--max-cpu-loras", str(kept),
            "--max-lora-rank", str(spec.lora_max_rank)]  # fmt: skip
    if not spec.trust_request_chat_template:
        argv.append("--trust-request-chat-template")
    return argv


def die_with_parent() -> None:
    """Runs in the child before exec: own process group, SIGTERM when the gateway dies."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerProcess:
    """Keeps one embedded worker process alive until `stop()`.

    Every start takes a port that is free right then (a port kept from an earlier run may have been
    taken meanwhile) and publishes the new address (and process id) on the `Worker`. A worker that was
    healthy and then fails `restart_after_failed_checks` health checks in a row (alive but wedged: a
    busy worker's slow probes do not count, see health.py) is restarted;
    so is one that never becomes healthy within the start timeout; a launch that fails outright
    (a bad engine Python, an unwritable folder) is logged and retried with the same backoff.
    """

    def __init__(
        self, worker: Worker, spec: ModelSpec, settings: Settings, cores: str | None, replica: int
    ) -> None:
        self.worker = worker
        self.spec = spec
        self.settings = settings
        self.cores = cores
        self.replica = replica
        self.plan = launch_plan(spec, settings, port_of(worker.url), cores, replica)
        self.log = WorkerLog(self.plan.log_path, settings.worker_log_max_bytes, settings.worker_log_backups)
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.launch_failures = 0
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # a launch and a stop never interleave

    async def supervise(self) -> None:
        """Run, wait, restart with backoff; returns once `stop()` was called."""
        backoff = self.settings.restart_backoff_initial
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                reason = await self._run_once(started)
                self.worker.mark(False)
                self.worker.pid = None
                if self._stopping.is_set():
                    break
                if time.monotonic() - started > STABLE_RUN_SECONDS:
                    backoff = self.settings.restart_backoff_initial
                tail = await asyncio.to_thread(log_tail, self.plan.log_path)
                log.error(
                    "worker %s (%s) %s; restarting in %.0f s. Log tail:\n%s",
                    self.worker.label, self.worker.model, reason, backoff, tail,
                )  # fmt: skip
                self.restarts += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                backoff = min(backoff * 2, self.settings.restart_backoff_max)
        finally:
            await asyncio.to_thread(self.log.close)

    async def _run_once(self, started: float) -> str:
        """One life of the process: launch it, then wait until it exits or must be stopped."""
        async with self._lock:
            if self._stopping.is_set():
                return "was not started (shutting down)"
            try:
                await self._start()
            except Exception as exc:  # the launch itself failed: no process to wait for
                self.launch_failures += 1
                return f"could not be launched ({type(exc).__name__}: {exc})"
        return await self._wait_for_exit(started)

    async def _start(self) -> None:
        port = free_port(self.settings.worker_host)
        self.worker.move(f"http://{self.settings.worker_host}:{port}")
        self.plan = launch_plan(self.spec, self.settings, port, self.cores, self.replica)
        output = self.log.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.plan.argv,
                env=self.plan.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        finally:
            os.close(output)  # the child has its copy; the copying thread ends when it exits
        self.worker.pid = self.process.pid  # where health checks look for signs of progress
        log.info(
            "worker %s (%s) launched on %s, pid %d, log %s",
            self.worker.label, self.worker.model, self.worker.url, self.process.pid, self.plan.log_path,
        )  # fmt: skip

    async def _wait_for_exit(self, started: float) -> str:
        """Wait until the process exits; kill it if it never became healthy in time, or if it
        stopped answering health checks after it had."""
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        limit = self.settings.worker_restart_after_failed_checks
        try:
            while not exited.done():
                await asyncio.wait({exited}, timeout=1.0)
                if exited.done() or self._stopping.is_set():
                    break
                ever_healthy = self.worker.seen_healthy
                if ever_healthy and limit and self.worker.failed_checks >= limit:
                    failed = self.worker.failed_checks
                    await self._terminate()
                    return f"stopped answering health checks ({failed} failed in a row)"
                too_slow = time.monotonic() - started > self.settings.worker_start_timeout
                if not ever_healthy and too_slow:
                    await self._terminate()
                    return f"was not healthy after {self.settings.worker_start_timeout:.0f} s"
            await exited
        finally:
            if not exited.done():
                exited.cancel()
        # The API server died on its own: vLLM's engine process outlives it in its group (a core and
        # gigabytes each, so relaunches would soon fail for memory). Nothing of that life may stay.
        _signal_group(self.process.pid, signal.SIGKILL)
        return f"exited with code {exited.result()}"

    async def stop(self) -> None:
        """Stop supervising and terminate the process group (SIGTERM, then SIGKILL). A launch in
        progress completes first, so its process is the one stopped."""
        self._stopping.set()
        async with self._lock:
            await self._terminate()

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=STOP_GRACE_SECONDS)
        except TimeoutError:
            log.warning("worker %s ignored SIGTERM; killing it", self.worker.label)
        # Whatever is left of the group (vLLM's engine process) goes too.
        _signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def build_embedded(settings: Settings, pools: dict[str, list[Worker]]) -> list[WorkerProcess]:
    """A supervised process per embedded replica; fills `pools` with their endpoints."""
    embedded = [spec for spec in settings.models if spec.embedded]
    total = sum(spec.replicas for spec in embedded)
    cores = sorted(os.sched_getaffinity(0)) if settings.worker_cpu_binding else []
    binding = iter(plan_core_binding(total, cores))
    processes = []
    for spec in embedded:
        for replica in range(spec.replicas):
            port = free_port(settings.worker_host)  # replaced at each start
            worker = Worker(
                model=spec.name, url=f"http://{settings.worker_host}:{port}", name=f"{spec.name}-{replica}"
            )
            pools.setdefault(spec.name, []).append(worker)
            processes.append(WorkerProcess(worker, spec, settings, next(binding), replica))
    return processes


def port_of(url: str) -> int:
    """The port of a worker URL."""
    port = urlsplit(url).port
    assert port is not None
    return port
