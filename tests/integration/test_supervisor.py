"""The embedded-worker supervisor with a fake engine (the stand-in launched the way vLLM is):
restart after a crash, kill-and-restart after a start timeout, nothing left after shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import psutil
import pytest

from service.app import create_app
from service.settings import ModelKind, ModelSpec, Settings
from service.supervisor import WorkerProcess
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


async def wait_for(condition: object, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_a_crashed_worker_is_restarted_and_stopped_on_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(fake_engine_settings(tmp_path))
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        worker = supervised.worker
        await wait_for(lambda: worker.healthy)
        first = supervised.process
        assert first is not None
        os.killpg(first.pid, signal.SIGKILL)
        await wait_for(lambda: not worker.healthy)
        await wait_for(lambda: worker.healthy and supervised.process is not first)
        assert supervised.restarts == 1
        second = supervised.process
        assert second is not None
    assert second.returncode is not None
    assert not psutil.pid_exists(second.pid) or psutil.Process(second.pid).status() == psutil.STATUS_ZOMBIE
    assert "exited with code -9; restarting" in caplog.text


async def test_a_worker_that_never_gets_healthy_is_killed_and_retried(tmp_path: Path) -> None:
    settings = fake_engine_settings(tmp_path, engine_env={"STANDIN_HEALTHY": "0"})
    settings = settings.model_copy(update={"worker_start_timeout": 1.0})
    app = create_app(settings)
    async with serve_in_background(app):
        supervised: WorkerProcess = app.state.processes[0]
        await wait_for(lambda: supervised.restarts >= 1, seconds=20)
        assert not supervised.worker.healthy
