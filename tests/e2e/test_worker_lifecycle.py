"""Supervision with real workers: a killed worker is restarted; SIGTERM leaves no process behind.

Runs last (file order): it kills workers and finally stops the gateway.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil

from tests.e2e.conftest import INSTRUCT_MODEL, Stack
from tests.promtext import parse

RESTART_TIMEOUT_SECONDS = 600
HEALTH_INTERVAL = 1.0  # what the stack fixture configures


def _worker_up(client: httpx.Client) -> float:
    """`gateway_worker_up` of the instruct model's only worker."""
    samples = parse(client.get("/metrics").text)
    return next(
        v
        for (name, labels), v in samples.items()
        if name == "gateway_worker_up" and ("model", INSTRUCT_MODEL) in labels
    )


def _worker_of(stack: Stack, model: str) -> psutil.Process:
    workers = [p for p in stack.worker_processes() if model in p.cmdline()]
    assert len(workers) == 1, workers
    return workers[0]


def test_a_killed_worker_is_restarted_and_serves_again(stack: Stack, client: httpx.Client) -> None:
    victim = _worker_of(stack, INSTRUCT_MODEL)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its engine process crash together
    killed = time.monotonic()
    while _worker_up(client) != 0:
        # Within one health interval (1 s here), with half a second for scheduling on a busy machine.
        assert time.monotonic() - killed < HEALTH_INTERVAL + 0.5, "gateway_worker_up still 1"
        time.sleep(0.05)
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["not_ready"] == [INSTRUCT_MODEL]
    unavailable = client.post("/chat", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert unavailable.status_code == 503
    assert unavailable.json()["error"]["type"] == "service_unavailable"

    deadline = time.monotonic() + RESTART_TIMEOUT_SECONDS
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, stack.log()[-3000:]
        time.sleep(1)
    assert _worker_of(stack, INSTRUCT_MODEL).pid != victim.pid
    assert _worker_up(client) == 1
    answer = client.post("/chat", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert answer.status_code == 200, answer.text


def test_sigterm_stops_the_gateway_and_every_worker(stack: Stack) -> None:
    workers = stack.worker_processes()
    assert len(workers) == 2
    groups = {worker.pid for worker in workers}  # each worker leads its own process group
    family = workers + [child for worker in workers for child in worker.children(recursive=True)]
    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(timeout=90) == 0
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.pid for p in alive]
    leftovers = [p for p in psutil.process_iter() if _in_groups(p, groups)]
    assert not leftovers, leftovers


def _in_groups(process: psutil.Process, groups: set[int]) -> bool:
    try:
        return os.getpgid(process.pid) in groups
    except (ProcessLookupError, psutil.Error):
        return False
