"""Several gateway processes on one port (GATEWAY_PROCESSES=2): one supervises the embedded worker (a
stand-in engine here) and the others follow its roster; metrics are merged; a dead serving process
or worker is replaced; SIGTERM drains every process and leaves nothing behind."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.ops.settings import Settings
from tests.gateway_process import Stack, launch, stop, wait_ready
from tests.helpers import wait_until
from tests.integration.conftest import TOKENIZER

STANDIN = Path(__file__).with_name("standin.py")
PROMPT = {"model": "fake", "prompt": "Hello", "max_tokens": 4}


def tree(gateway: Stack) -> list[psutil.Process]:
    return psutil.Process(gateway.process.pid).children(recursive=True)


def running(gateway: Stack, marker: str) -> list[psutil.Process]:
    found = []
    for process in tree(gateway):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone, or a zombie not yet reaped
            continue
    return found


def serving(gateway: Stack) -> list[psutil.Process]:
    return running(gateway, "service.api.processes")


def engines(gateway: Stack) -> list[psutil.Process]:
    return running(gateway, str(STANDIN))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("processes")
    engine = folder / "fake-python"
    engine.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {STANDIN} "$@"\n')
    engine.chmod(0o755)
    model = {
        "name": "fake",
        "kind": "base",
        "source": str(folder),
        "tokenizer": Settings().resolve_source(TOKENIZER),
    }
    env = {
        "GATEWAY_PROCESSES": "2", "GATEWAY_MODELS": json.dumps([model]),
        "GATEWAY_ENGINE_PYTHON": str(engine), "GATEWAY_CACHE_DIR": str(folder),
        "GATEWAY_HEALTH_INTERVAL": "0.2", "GATEWAY_RESTART_BACKOFF_INITIAL": "0.2",
        "GATEWAY_DRAIN_ACCEPT_WINDOW": "1", "GATEWAY_LOG_FORMAT": "text",
    }  # fmt: skip
    started = launch(env, folder / "gateway.log")
    try:
        wait_ready(started, seconds=60)
        yield started
    finally:
        stop(started)


def complete(gateway: Stack) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/completions", json=PROMPT, timeout=10)  # a new connection each


def requests_counted(gateway: Stack) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels.get("endpoint") == "v1_completions"
    )


def test_two_processes_serve_one_port_with_one_supervising_the_worker(gateway: Stack) -> None:
    assert len(serving(gateway)) == 2 and len(engines(gateway)) == 1
    before = requests_counted(gateway)
    answers = [complete(gateway) for _ in range(40)]
    assert all(answer.status_code == 200 for answer in answers)
    # Request ids start with a per-process prefix: both processes answered.
    prefixes = {answer.headers["x-request-id"][:16] for answer in answers}
    assert len(prefixes) == 2, prefixes
    assert requests_counted(gateway) - before == 40  # one /metrics shows both processes' requests


def test_a_restarted_worker_is_followed_by_every_process(gateway: Stack) -> None:
    (engine,) = engines(gateway)
    old_port = engine.cmdline()[engine.cmdline().index("--port") + 1]
    engine.kill()
    wait_until(lambda: len(engines(gateway)) == 1 and engines(gateway)[0].pid != engine.pid, 30)
    new = engines(gateway)[0]
    assert new.cmdline()[new.cmdline().index("--port") + 1] != old_port
    wait_ready(gateway, seconds=60)
    wait_until(lambda: all(complete(gateway).status_code == 200 for _ in range(10)), 30)
    answers = [complete(gateway) for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.headers["x-request-id"][:16] for a in answers}) == 2  # both found the new port


def test_a_serving_process_that_dies_is_replaced(gateway: Stack) -> None:
    victim = serving(gateway)[0]
    victim.kill()
    wait_until(lambda: len(serving(gateway)) == 2 and victim.pid not in {p.pid for p in serving(gateway)}, 30)
    wait_until(lambda: all(complete(gateway).status_code == 200 for _ in range(10)), 30)
    assert "exited with -9; starting it again" in gateway.log()


def test_sigterm_drains_every_process_and_leaves_nothing(gateway: Stack) -> None:
    processes = tree(gateway)
    roster = next(Path(p.environ()["GATEWAY_ROSTER_FILE"]) for p in serving(gateway))
    assert roster.exists()
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503  # load balancers: go elsewhere
    assert complete(gateway).status_code == 200  # ...but requests are still served meanwhile
    assert gateway.process.wait(timeout=30) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    assert not roster.parent.exists()
    assert "gateway stopped: 2 serving processes, 1 workers" in gateway.log()
