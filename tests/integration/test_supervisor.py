"""The embedded-worker supervisor with a fake engine (the stand-in launched the way vLLM is):
restart after a crash, kill-and-restart after a start timeout, nothing left after shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import service.workers.supervisor
from service.api.app import create_app
from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.supervisor import WorkerProcess, free_port
from service.workers.worker import Worker
from tests.helpers import eventually, stream_payloads
from tests.integration.conftest import TOKENIZER, serve_in_background

STANDIN = Path(__file__).with_name("standin.py")


def fake_engine_settings(tmp_path: Path, **spec_overrides: object) -> Settings:
    engine = tmp_path / "fake-python"
    # Called as `<engine> -m vllm.entrypoints.openai.api_server --model ... --port N ...`.
    engine.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {STANDIN} "$@"\n')
    engine.chmod(engine.stat().st_mode | stat.S_IEXEC)
    tokenizer = Settings().resolve_source(TOKENIZER)  # the real cache, not tmp_path
    spec = ModelSpec(
        name="fake", kind=ModelKind.BASE, source=str(tmp_path), tokenizer=tokenizer, **spec_overrides
    )  # type: ignore[arg-type]
    return Settings(
        models=[spec],
        engine_python=str(engine),
        cache_dir=tmp_path,
        health_interval=0.1,
        restart_backoff_initial=0.1,
    )


async def test_a_crashed_worker_is_restarted_and_stopped_on_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(fake_engine_settings(tmp_path))
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        worker = supervised.worker
        await eventually(lambda: worker.healthy, seconds=30)
        first = supervised.process
        assert first is not None and worker.pid == first.pid  # where health checks look for progress
        os.killpg(first.pid, signal.SIGKILL)
        await eventually(lambda: not worker.healthy, seconds=30)
        await eventually(lambda: worker.healthy and supervised.process is not first, seconds=30)
        assert supervised.restarts == 1
        second = supervised.process
        assert second is not None
    assert second.returncode is not None
    assert not psutil.pid_exists(second.pid) or psutil.Process(second.pid).status() == psutil.STATUS_ZOMBIE
    assert "exited with code -9; restarting" in caplog.text


def with_engine(launcher: Path, engine_pid: Path) -> None:
    """The fake worker starts an "engine" child in its process group first, as vLLM's API server does."""
    script = launcher.read_text().replace("shift 2\n", f"shift 2\nsleep 300 &\necho $! > {engine_pid}\n")
    launcher.write_text(script)


async def test_what_a_worker_leaves_in_its_group_when_it_dies_goes_with_it(tmp_path: Path) -> None:
    """vLLM's engine runs in a process of its own in the worker's group: an API server that died by itself
    (OOM-killed, crashed) left it running, 4.5 GB each, until relaunches failed for memory (review, s27)."""
    settings = fake_engine_settings(tmp_path)
    engine_pid = tmp_path / "engine.pid"
    with_engine(Path(settings.engine_python), engine_pid)
    app = create_app(settings)
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        await eventually(lambda: supervised.worker.healthy, seconds=30)
        first = supervised.process
        assert first is not None
        orphan = psutil.Process(int(engine_pid.read_text()))
        assert os.getpgid(orphan.pid) == first.pid  # the "engine" shares the worker's group
        os.kill(first.pid, signal.SIGKILL)  # the API server alone dies
        await eventually(lambda: supervised.restarts == 1, seconds=30)
        await eventually(
            lambda: not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE, seconds=10
        )


async def test_a_worker_that_never_gets_healthy_is_killed_and_retried(tmp_path: Path) -> None:
    settings = fake_engine_settings(tmp_path, engine_env={"STANDIN_HEALTHY": "0"})
    settings = settings.model_copy(update={"worker_start_timeout": 1.0})
    app = create_app(settings)
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        await eventually(lambda: supervised.restarts >= 1, seconds=20)
        assert not supervised.worker.healthy


async def test_a_worker_that_wedges_after_being_healthy_is_restarted(tmp_path: Path) -> None:
    """Alive but not answering (here: SIGSTOP) is as bad as dead once it lasts."""
    settings = fake_engine_settings(tmp_path).model_copy(
        update={"worker_restart_after_failed_checks": 3, "health_timeout": 0.2}
    )
    app = create_app(settings)
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        await eventually(lambda: supervised.worker.healthy, seconds=30)
        wedged = supervised.process
        assert wedged is not None
        os.kill(wedged.pid, signal.SIGSTOP)
        await eventually(lambda: not supervised.worker.healthy, seconds=30)  # ejected...
        await eventually(lambda: supervised.restarts == 1 and supervised.worker.healthy, seconds=30)
        assert wedged.returncode is not None  # the wedged one was killed, not left behind


async def test_a_busy_worker_whose_probes_time_out_is_neither_ejected_nor_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its /health waits behind a stream that still delivers tokens: busy, not wedged."""
    caplog.set_level(logging.INFO)
    busy = {"STANDIN_HEALTH_HANGS_WHILE_BUSY": "1", "STANDIN_TOKEN_DELAY": "1.0"}
    settings = fake_engine_settings(tmp_path, engine_env=busy).model_copy(
        update={"worker_restart_after_failed_checks": 3, "health_timeout": 0.5}
    )
    app = create_app(settings)
    async with serve_in_background(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        supervised: WorkerProcess = app.state.processes[0]
        worker = supervised.worker
        await eventually(lambda: worker.healthy, seconds=30)
        seen_down = False

        async def watch() -> None:
            nonlocal seen_down
            while True:
                seen_down = seen_down or not worker.healthy
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        payloads = await stream_payloads(http, "/v1/completions", {"model": "fake", "prompt": "x"})
        watcher.cancel()
        assert payloads[-1] == "[DONE]"  # the stream was not cut by a restart
        assert not seen_down and supervised.restarts == 0
        assert "answered no probe within 0.5 s but is busy" in caplog.text  # its probes did time out


async def test_a_launch_that_fails_is_logged_retried_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fake_engine_settings(tmp_path).model_copy(
        update={"engine_python": str(tmp_path / "no-python")}
    )
    app = create_app(settings)
    async with serve_in_background(app) as url:
        supervised: WorkerProcess = app.state.processes[0]
        await eventually(lambda: supervised.launch_failures >= 2, seconds=30)  # retried, with backoff
        async with httpx.AsyncClient(base_url=url) as http:
            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.json()["not_ready"] == ["fake"]
            assert 'gateway_worker_up{model="fake",worker="fake-0"} 0.0' in (await http.get("/metrics")).text
    assert "could not be launched (FileNotFoundError" in caplog.text


async def test_stopping_while_a_launch_is_under_way_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fake_engine_settings(tmp_path)
    spec = settings.models[0]
    worker = Worker(model="fake", url=f"http://127.0.0.1:{free_port('127.0.0.1')}", name="fake-0")
    supervised = WorkerProcess(worker, spec, settings, None, 0)
    launching, release = asyncio.Event(), asyncio.Event()
    real_exec = asyncio.create_subprocess_exec

    async def slow_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        launching.set()
        await release.wait()  # the shutdown arrives right now
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(service.workers.supervisor.asyncio, "create_subprocess_exec", slow_exec)
    supervising = asyncio.ensure_future(supervised.supervise())
    await launching.wait()
    stopping = asyncio.ensure_future(supervised.stop())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(asyncio.gather(stopping, supervising), timeout=15)
    process = supervised.process
    assert process is not None and process.returncode is not None  # launched, then stopped at once


async def test_each_start_takes_a_free_port(tmp_path: Path) -> None:
    """If another process takes the worker's port while it is down, the next start uses another."""
    app = create_app(fake_engine_settings(tmp_path))
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        worker = supervised.worker
        await eventually(lambda: worker.healthy, seconds=30)
        old_url, process = worker.url, supervised.process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", int(old_url.rsplit(":", 1)[1])))  # someone else takes the port
        squatter.listen()
        try:
            await eventually(lambda: supervised.restarts == 1 and worker.healthy, seconds=30)
            assert worker.url != old_url
            assert worker.name == "fake-0"  # the metric label stays
        finally:
            squatter.close()


async def test_worker_output_is_rotated_at_the_size_cap(tmp_path: Path) -> None:
    chatty = tmp_path / "chatty-python"
    # Writes ~2 MB of log lines, then serves as the stand-in does.
    writer = "for i in range(20000): print('line', i, 'x' * 90)"
    chatty.write_text(
        f'#!/bin/sh\nshift 2\n{sys.executable} -c "{writer}"\nexec {sys.executable} {STANDIN} "$@"\n'
    )
    chatty.chmod(chatty.stat().st_mode | stat.S_IEXEC)
    settings = fake_engine_settings(tmp_path).model_copy(
        update={"engine_python": str(chatty), "worker_log_max_bytes": 100_000, "worker_log_backups": 2}
    )
    app = create_app(settings)
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        await eventually(lambda: supervised.worker.healthy, seconds=30)
        log_path = supervised.plan.log_path
    files = sorted(log_path.parent.glob(log_path.name + "*"))
    assert [f.name for f in files] == [log_path.name, log_path.name + ".1", log_path.name + ".2"]
    assert all(f.stat().st_size <= 100_000 for f in files)
    assert "line 19999" in (log_path.parent / (log_path.name + ".1")).read_text() + log_path.read_text()
