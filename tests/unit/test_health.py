"""Health verdicts, one per kind of probe outcome, with the in-memory transport. Workers' addresses are
real loopback sockets (a listening socket accepts connections without any program answering, as the
kernel does for a busy or stopped worker) and embedded workers' processes are real processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from service.errors import UpstreamUnavailable, WorkerAuthFailed, WorkersRefuseKey
from service.ops.settings import ModelKind, ModelSpec
from service.workers.fake import FakeTransport
from service.workers.health import HealthMonitor
from service.workers.pool import ModelPool
from service.workers.worker import Worker
from tests.unit.test_proc_stat import process_tree

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")
LIMIT = 0.2  # the configured probe limit in these tests


class Probes(FakeTransport):
    """The fake transport, with probes that can hang, fail, or be answered late; it counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.delay: dict[str, float] = {}  # url -> seconds before /health answers
        self.error: dict[str, Exception] = {}  # url -> what /health raises
        self.slow_facts: dict[str, float] = {}  # path -> seconds before it answers
        self.probes: dict[str, int] = {}

    async def health(self, worker: Worker) -> bool:
        self.probes[worker.url] = self.probes.get(worker.url, 0) + 1
        if worker.url in self.error:
            raise self.error[worker.url]
        # In steps: a probe needs the gateway's loop to run (to connect, send, read) until it is over.
        for _ in range(round(self.delay.get(worker.url, 0.0) / 0.01)):
            await asyncio.sleep(0.01)
        return await super().health(worker)

    async def get_json(self, worker: Worker, path: str) -> Any:
        await asyncio.sleep(self.slow_facts.get(path, 0.0))
        return await super().get_json(worker, path)


@pytest.fixture
def listening() -> Iterator[str]:
    """A worker address whose connections the kernel accepts, where nothing ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def closed() -> str:
    """A worker address where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def process(code: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real process running `code`, killed afterwards."""
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)  # past the interpreter's start-up
        yield child
    finally:
        child.kill()
        child.wait()


def monitor(transport: Probes, *workers: Worker, **options: Any) -> HealthMonitor:
    return HealthMonitor(transport, [ModelPool(SPEC, list(workers))], 0.05, timeout=LIMIT, **options)


def model_entry(length: int) -> dict[str, Any]:
    return {"data": [{"id": "m", "max_model_len": length}]}


async def test_an_answered_probe_is_up_and_reads_the_facts(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = model_entry(2048)
    assert await monitor(probes, worker).check(worker)
    assert worker.failed_checks == 0 and worker.max_model_len == 2048 and worker.answered_at > 0


async def test_a_non_200_answer_is_down_at_once(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening, up=True)
    probes.healthy[listening] = False
    assert not await monitor(probes, worker).check(worker)
    assert worker.failed_checks == 1


async def test_a_refused_probe_is_down_at_once_even_with_bytes_arriving(closed: str) -> None:
    probes, worker = Probes(), Worker("m", closed, up=True)
    probes.error[closed] = ConnectionRefusedError("refused")
    worker.progress_at = time.monotonic() + 60  # bytes are no excuse for refusing connections
    assert not await monitor(probes, worker).check(worker)
    assert worker.failed_checks == 1


async def test_a_slow_probe_where_no_connection_is_accepted_is_down(closed: str) -> None:
    probes, worker = Probes(), Worker("m", closed, up=True)
    probes.delay[closed] = 5.0  # e.g. a pooled connection to a host that is gone
    worker.progress_at = time.monotonic() + 60
    assert not await monitor(probes, worker).check(worker)


async def test_a_slow_idle_worker_showing_no_progress_fails_its_check(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening, up=True)
    probes.delay[listening] = 5.0
    started = time.monotonic()
    assert not await monitor(probes, worker).check(worker)
    assert worker.failed_checks == 1 and worker.probe_timeout is None
    assert time.monotonic() - started < 1.0  # judged at its limit, not when the probe gave up


async def test_a_slow_worker_whose_requests_progress_stays_in_and_gets_longer(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening, up=True, failed_checks=2)
    probes.delay[listening] = 5.0
    health = monitor(probes, worker)

    async def stream_bytes() -> None:
        await asyncio.sleep(LIMIT / 2)
        worker.progress_at = time.monotonic()  # what a relayed block does

    await asyncio.gather(health.check(worker), stream_bytes())
    assert worker.healthy and worker.failed_checks == 0  # not counted as failing, and the row is broken
    assert worker.probe_timeout == 2 * LIMIT  # the next probe may take longer
    assert await health.check(worker)  # bytes from before the last check, but recent: still busy
    worker.progress_at -= health.recent  # no bytes for longer than the longest probe
    worker.outstanding = 1  # a stream is open on it
    assert not await health.check(worker)
    assert worker.failed_checks == 0 and worker.probe_timeout is None  # out, but its stream may go on
    worker.outstanding = 0  # nothing open that a restart would cut
    assert not await health.check(worker)
    assert worker.failed_checks == 1  # counted toward a restart
    worker.outstanding = 1
    worker.progress_at -= health.stream_limit  # longer than the gateway waits between a stream's tokens
    assert not await health.check(worker)
    assert worker.failed_checks == 2


async def test_a_busy_probe_limit_is_capped(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening, up=True, probe_timeout=4 * LIMIT)
    probes.delay[listening] = 0.05
    health = monitor(probes, worker)
    worker.progress_at = time.monotonic() + 60
    assert await health.check(worker)
    assert worker.probe_timeout is None  # answered quickly: back to the configured limit
    probes.delay[listening] = 1.5 * LIMIT
    worker.probe_timeout = 2 * LIMIT
    assert await health.check(worker)
    assert worker.probe_timeout == pytest.approx(3 * LIMIT, rel=0.3)  # twice what it took


async def test_an_embedded_worker_using_cpu_is_busy(listening: str) -> None:
    probes = Probes()
    probes.delay[listening] = 5.0
    with process("while True: pass") as spinning:
        worker = Worker("m", listening, up=True, pid=spinning.pid, answered_at=time.monotonic())
        assert await monitor(probes, worker).check(worker)
    assert worker.failed_checks == 0


async def test_an_embedded_worker_stopped_by_sigstop_is_wedged(listening: str) -> None:
    probes = Probes()
    probes.delay[listening] = 5.0
    with process_tree() as (server, _engine):
        os.kill(server, signal.SIGSTOP)  # the API server stops; its engine process still spins
        worker = Worker("m", listening, up=True, pid=server, answered_at=time.monotonic())
        assert not await monitor(probes, worker).check(worker)
    assert worker.failed_checks == 1


async def test_an_embedded_worker_idle_and_silent_is_wedged(listening: str) -> None:
    probes = Probes()
    probes.delay[listening] = 5.0
    with process("import time; time.sleep(60)") as sleeping:
        worker = Worker("m", listening, up=True, pid=sleeping.pid, answered_at=time.monotonic())
        assert not await monitor(probes, worker).check(worker)


async def test_cpu_alone_vouches_for_a_silent_worker_only_so_long(listening: str) -> None:
    probes = Probes()
    probes.delay[listening] = 5.0
    with process("while True: pass") as spinning:
        worker = Worker("m", listening, up=True, pid=spinning.pid, answered_at=time.monotonic() - 11)
        assert not await monitor(probes, worker, silence_limit=10).check(worker)


async def test_a_stall_of_the_gateways_loop_is_not_the_workers_fault(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening, up=True)
    probes.delay[listening] = LIMIT / 2  # the probe takes half its limit of the gateway's running time...
    check = asyncio.ensure_future(monitor(probes, worker).check(worker))
    await asyncio.sleep(0.02)
    time.sleep(3 * LIMIT)  # noqa: ASYNC251 (...but the gateway's loop is blocked past the limit)
    assert await check
    assert worker.failed_checks == 0


async def test_a_slow_probe_holds_up_no_other_workers_check(listening: str) -> None:
    probes = Probes()
    slow, quick = Worker("m", listening, up=True), Worker("m", listening + "/quick", up=True)
    probes.delay[slow.url] = 5.0
    slow.progress_at = time.monotonic() + 60  # busy: kept, with ever longer probes
    running = asyncio.ensure_future(monitor(probes, slow, quick).run())
    await asyncio.sleep(1.0)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert probes.probes[quick.url] >= 10 and probes.probes[slow.url] <= 4
    assert slow.healthy and quick.healthy


async def test_a_failing_or_slow_fact_never_marks_a_worker_down(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening)
    probes.slow_facts["/v1/models"] = 5.0
    assert await monitor(probes, worker).check(worker)  # up, though its facts could not be read
    assert worker.max_model_len is None and "read_model_entry" in worker.facts_failing


async def test_a_failed_fact_read_keeps_what_was_known_and_is_retried(
    listening: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = model_entry(2048)
    health = monitor(probes, worker, facts_interval=0.01)
    await health.check(worker)
    del probes.facts[(listening, "/v1/models")]
    await asyncio.sleep(0.02)
    for _ in range(3):
        assert await health.check(worker)
    assert worker.max_model_len == 2048  # kept
    assert caplog.text.count("read_model_entry failed") == 1  # said once
    probes.facts[(listening, "/v1/models")] = model_entry(1024)
    await health.check(worker)  # retried at the next check
    assert worker.max_model_len == 1024 and not worker.facts_failing
    assert "context 2048 -> 1024 tokens" in caplog.text


async def test_facts_are_read_again_when_a_worker_comes_back(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = model_entry(2048)
    health = monitor(probes, worker)  # facts_interval: a minute
    await health.check(worker)
    probes.facts[(listening, "/v1/models")] = model_entry(1024)  # replaced behind the same address
    await health.check(worker)
    assert worker.max_model_len == 2048  # not due yet while it stays up
    probes.healthy[listening] = False
    await health.check(worker)
    probes.healthy[listening] = True
    await health.check(worker)
    assert worker.max_model_len == 1024


async def test_facts_are_read_again_when_a_worker_moves_and_periodically(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = model_entry(2048)
    health = monitor(probes, worker, facts_interval=0.2)
    await health.check(worker)
    moved = listening + "/"  # another address (FakeTransport scripts by URL)
    probes.facts[(moved, "/v1/models")] = model_entry(1024)
    worker.move(moved)
    assert not worker.healthy and worker.max_model_len == 2048  # down, and what it said stays meanwhile
    await health.check(worker)
    assert worker.max_model_len == 1024
    probes.facts[(moved, "/v1/models")] = model_entry(4096)
    await asyncio.sleep(0.25)
    await health.check(worker)
    assert worker.max_model_len == 4096


async def test_a_models_context_comes_from_its_current_healthy_workers(
    listening: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    old, new = Worker("m", listening, max_model_len=2048), Worker("m", listening + "/", max_model_len=1024)
    pool = ModelPool(SPEC, [old, new])
    assert pool.max_model_len == 1024  # none healthy: the last known, smallest
    old.mark(True)
    assert pool.max_model_len == 2048
    new.mark(True)
    assert pool.max_model_len == 1024  # fits both
    configured = ModelPool(SPEC.model_copy(update={"max_model_len": 512}), [old, new])
    assert configured.max_model_len == 512
    probes = Probes()
    health = HealthMonitor(probes, [pool], 0.05, timeout=LIMIT)
    await health.check_all()
    probes.healthy[new.url] = False
    await health.check_all()
    probes.healthy[new.url] = True
    await health.check_all()
    assert caplog.text.count("model m: context") == 2  # 2048 when `new` left, 1024 when it came back


async def test_an_unreachable_external_worker_is_logged_once_with_the_reason_and_again_when_back(
    closed: str, caplog: pytest.LogCaptureFixture
) -> None:
    external = ModelSpec(name="m", kind=ModelKind.BASE, tokenizer="/t", urls=[closed])  # type: ignore[list-item]
    probes, worker = Probes(), Worker("m", closed)  # never seen up: a wrong URL from the start
    probes.error[closed] = ConnectionRefusedError("Connect call failed")
    health = HealthMonitor(probes, [ModelPool(external, [worker])], 0.05, timeout=LIMIT)
    with caplog.at_level(logging.INFO, logger="service.workers.health"):
        for _ in range(3):
            await health.check_all()
        down = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
        assert len(down) == 1 and "ConnectionRefusedError: Connect call failed" in down[0], down
        del probes.error[closed]
        for _ in range(2):
            await health.check_all()
    back = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len(back) == 1 and worker.healthy


async def test_an_embedded_worker_starting_up_is_not_reported_unreachable(
    closed: str, caplog: pytest.LogCaptureFixture
) -> None:
    probes, worker = Probes(), Worker("m", closed)
    probes.error[closed] = ConnectionRefusedError("Connect call failed")
    health = HealthMonitor(probes, [ModelPool(SPEC, [worker])], 0.05, timeout=LIMIT)  # the gateway's own
    with caplog.at_level(logging.INFO, logger="service.workers.health"):
        await health.check_all()
    assert not [r for r in caplog.records if "cannot be reached" in r.getMessage()]


async def test_a_worker_refusing_the_gateways_key_is_down_and_says_why(
    listening: str, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM leaves /health open, so a wrong worker key passes the probe; the fact read's 401 decides."""
    caplog.set_level(logging.INFO)
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = WorkerAuthFailed("m", 401)
    pool = ModelPool(SPEC, [worker])
    health = HealthMonitor(probes, [pool], 0.05, timeout=LIMIT)
    for _ in range(3):
        assert not await health.check(worker)
    assert "refused the gateway's worker key (HTTP 401)" in worker.down_reason
    # Every worker refusing the key: requests hear it as the gateway's 502, not a 503 to retry.
    with pytest.raises(WorkersRefuseKey) as unavailable:
        await pool.acquire()
    assert unavailable.value.status_code == 502 and "could not authenticate" in unavailable.value.message
    assert "GATEWAY_WORKER_API_KEY" in worker.down_reason
    assert worker.failed_checks == 0  # a restart would not mend a configuration
    assert caplog.text.count("is down: it refused the gateway's worker key") == 1  # said once, at once
    probes.facts[(listening, "/v1/models")] = model_entry(2048)  # the key is put right
    assert await health.check(worker)
    assert worker.down_reason == "" and worker.max_model_len == 2048 and worker.refused_status is None


async def test_a_healthy_worker_whose_key_changes_is_taken_out(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = model_entry(2048)
    probes.facts[(listening, "/metrics")] = "vllm:num_requests_running 0\n"
    health = HealthMonitor(probes, [ModelPool(SPEC, [worker])], 0.05, timeout=LIMIT, engine_load=True)
    assert await health.check(worker)
    # Facts are not due again for a minute; the engine figures are read at every check.
    probes.facts[(listening, "/metrics")] = WorkerAuthFailed("m", 403)
    assert not await health.check(worker)
    assert "HTTP 403" in worker.down_reason


async def test_other_fact_failures_still_never_mark_a_worker_down(listening: str) -> None:
    probes, worker = Probes(), Worker("m", listening)
    probes.facts[(listening, "/v1/models")] = UpstreamUnavailable("the worker answered HTTP 500")
    assert await monitor(probes, worker).check(worker)
