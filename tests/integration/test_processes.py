"""Several gateway processes on one port (GATEWAY_PROCESSES=2): one supervises the embedded worker (a
stand-in engine here) and the others follow its roster; metrics are merged; a dead serving process
or worker is replaced; SIGTERM drains every process and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.ops.settings import Settings
from service.workers.supervisor import free_port
from tests.helpers import wait_until
from tests.integration.conftest import TOKENIZER

STANDIN = Path(__file__).with_name("standin.py")
PROMPT = {"model": "fake", "prompt": "Hello", "max_tokens": 4}


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def running(self, marker: str) -> list[psutil.Process]:
        found = []
        for process in self.tree():
            try:
                if marker in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:  # gone, or a zombie not yet reaped
                continue
        return found

    def serving(self) -> list[psutil.Process]:
        return self.running("service.api.processes")

    def engines(self) -> list[psutil.Process]:
        return self.running(str(STANDIN))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
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
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_PORT=str(port), GATEWAY_PROCESSES="2", GATEWAY_MODELS=json.dumps([model]),
        GATEWAY_ENGINE_PYTHON=str(engine), GATEWAY_CACHE_DIR=str(folder), GATEWAY_HEALTH_INTERVAL="0.2",
        GATEWAY_RESTART_BACKOFF_INITIAL="0.2", GATEWAY_DRAIN_ACCEPT_WINDOW="1", GATEWAY_LOG_FORMAT="text",
    )  # fmt: skip
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = folder / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=out, stderr=out
        )
    running = Gateway(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(running)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_ready(gateway: Gateway, seconds: float = 60) -> None:
    def ready() -> bool:
        assert gateway.process.poll() is None, gateway.log.read_text()[-3000:]
        try:
            return httpx.get(f"{gateway.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, seconds, lambda: gateway.log.read_text()[-3000:])


def complete(gateway: Gateway) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/completions", json=PROMPT, timeout=10)  # a new connection each


def requests_counted(gateway: Gateway) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels.get("endpoint") == "v1_completions"
    )


def test_two_processes_serve_one_port_with_one_supervising_the_worker(gateway: Gateway) -> None:
    assert len(gateway.serving()) == 2 and len(gateway.engines()) == 1
    before = requests_counted(gateway)
    answers = [complete(gateway) for _ in range(40)]
    assert all(answer.status_code == 200 for answer in answers)
    # Request ids start with a per-process prefix: both processes answered.
    prefixes = {answer.headers["x-request-id"][:16] for answer in answers}
    assert len(prefixes) == 2, prefixes
    assert requests_counted(gateway) - before == 40  # one /metrics shows both processes' requests


def test_a_restarted_worker_is_followed_by_every_process(gateway: Gateway) -> None:
    (engine,) = gateway.engines()
    old_port = engine.cmdline()[engine.cmdline().index("--port") + 1]
    engine.kill()
    wait_until(lambda: len(gateway.engines()) == 1 and gateway.engines()[0].pid != engine.pid, 30)
    new = gateway.engines()[0]
    assert new.cmdline()[new.cmdline().index("--port") + 1] != old_port
    wait_ready(gateway)
    wait_until(lambda: all(complete(gateway).status_code == 200 for _ in range(10)), 30)
    answers = [complete(gateway) for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.headers["x-request-id"][:16] for a in answers}) == 2  # both found the new port


def test_a_serving_process_that_dies_is_replaced(gateway: Gateway) -> None:
    victim = gateway.serving()[0]
    victim.kill()
    wait_until(
        lambda: len(gateway.serving()) == 2 and victim.pid not in {p.pid for p in gateway.serving()}, 30
    )
    wait_until(lambda: all(complete(gateway).status_code == 200 for _ in range(10)), 30)
    assert "exited with -9; starting it again" in gateway.log.read_text()


def test_sigterm_drains_every_process_and_leaves_nothing(gateway: Gateway) -> None:
    tree = gateway.tree()
    roster = next(Path(p.environ()["GATEWAY_ROSTER_FILE"]) for p in gateway.serving())
    assert roster.exists()
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503  # load balancers: go elsewhere
    assert complete(gateway).status_code == 200  # ...but requests are still served meanwhile
    assert gateway.process.wait(timeout=30) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    assert not roster.parent.exists()
    assert "gateway stopped: 2 serving processes, 1 workers" in gateway.log.read_text()
