"""Supervision with real workers: a killed worker is restarted; SIGTERM leaves no process behind.

Runs last (file order): it kills workers and finally stops the gateway.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, OPERATOR, Stack
from tests.promtext import parse

RESTART_TIMEOUT_SECONDS = 600
HEALTH_INTERVAL = 1.0  # what the stack fixture configures
DRAIN_ACCEPT_WINDOW = 2.0  # likewise


def _worker_up(client: httpx.Client) -> float:
    """`gateway_worker_up` of the instruct model's only worker."""
    samples = parse(client.get("/metrics", headers=OPERATOR).text)
    return next(
        v
        for (name, labels), v in samples.items()
        if name == "gateway_worker_up" and ("model", INSTRUCT_MODEL) in labels
    )


def _worker_of(stack: Stack, model: str) -> psutil.Process:
    workers = [p for p in stack.worker_processes() if model in p.cmdline()]
    assert len(workers) == 1, workers
    return workers[0]


def test_a_worker_killed_mid_stream_ends_the_stream_cleanly_and_is_restarted(
    stack: Stack, client: httpx.Client
) -> None:
    victim = _worker_of(stack, INSTRUCT_MODEL)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 500,
            "ignore_eos": True, "stream": True, "model": INSTRUCT_MODEL}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        os.killpg(victim.pid, signal.SIGKILL)  # the worker and its engine process crash together
        killed = time.monotonic()
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["object"] == "chat.completion.chunk"
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["type"] == "upstream_error"
    while _worker_up(client) != 0:
        # Within one health interval (1 s here), with half a second for scheduling on a busy machine.
        assert time.monotonic() - killed < HEALTH_INTERVAL + 0.5, "gateway_worker_up still 1"
        time.sleep(0.05)
    deadline = time.monotonic() + RESTART_TIMEOUT_SECONDS
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, stack.log()[-3000:]
        time.sleep(1)
    assert _worker_of(stack, INSTRUCT_MODEL).pid != victim.pid
    assert _worker_up(client) == 1
    answer = client.post("/chat", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert answer.status_code == 200, answer.text


def test_sigterm_drains_then_stops_the_gateway_and_every_worker(stack: Stack, client: httpx.Client) -> None:
    workers = stack.worker_processes()
    assert len(workers) == 2
    groups = {worker.pid for worker in workers}  # each worker leads its own process group
    family = workers + [child for worker in workers for child in worker.children(recursive=True)]
    body = {
        "model": BASE_MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 120,
        "ignore_eos": True,
        "stream": True,
    }
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        stack.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        # Still served during the accept window (a balancer may not have stopped routing here yet)...
        assert client.post("/complete", json={"prompt": "x", "max_tokens": 1}).status_code == 200
        time.sleep(max(0.0, DRAIN_ACCEPT_WINDOW + 0.5 - (time.monotonic() - signalled)))
        # ...then refused while the stream in flight finishes.
        refused = client.post("/complete", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"  # the stream in flight finished
    assert stack.process.wait(timeout=120) == 0
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.pid for p in alive]
    leftovers = [p for p in psutil.process_iter() if _in_groups(p, groups)]
    assert not leftovers, leftovers


def _in_groups(process: psutil.Process, groups: set[int]) -> bool:
    try:
        return os.getpgid(process.pid) in groups
    except (ProcessLookupError, psutil.Error):
        return False
