"""Supervision of a real vLLM worker on a gateway of its own (`smol`: SmolLM2 only, so restarting it
does not disturb the shared stack): a worker starved of CPU (its probes unanswered while its requests
still complete) keeps serving and is not restarted; a worker that wedges (alive, not answering) is
restarted; the new process takes a fresh port while someone else holds the old one; its log is
rotated at the cap."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil

from service.ops.settings import Settings
from tests.e2e.conftest import SMOL, SMOL_LOG_CAP, Stack, wait_ready


def api_server(stack: Stack) -> psutil.Process:
    servers = stack.worker_processes()
    assert len(servers) == 1, servers
    return servers[0]


def take_port(port: int, seconds: float = 30) -> socket.socket:
    """Listen on `port` as soon as every process of the old worker has let go of it."""
    deadline = time.monotonic() + seconds
    while True:
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", port))
        except OSError:
            squatter.close()
            assert time.monotonic() < deadline, f"port {port} still held"
            time.sleep(0.05)
            continue
        squatter.listen()
        return squatter


def port_of(process: psutil.Process) -> int:
    argv = process.cmdline()
    return int(argv[argv.index("--port") + 1])


def starve(pgid: int, stop: float, run: float, cycles: int) -> None:
    """Starve a process group of CPU as a crowded machine would, only harder: stopped `stop` seconds
    (its probes go unanswered), then running `run` seconds (its requests advance), `cycles` times."""
    with contextlib.suppress(ProcessLookupError):  # restarted meanwhile: the test says so
        try:
            for _ in range(cycles):
                os.killpg(pgid, signal.SIGSTOP)
                time.sleep(stop)
                os.killpg(pgid, signal.SIGCONT)
                time.sleep(run)
        finally:
            os.killpg(pgid, signal.SIGCONT)


def test_a_worker_starved_of_cpu_keeps_serving_and_is_not_restarted(smol: Stack) -> None:
    """Stopped 80 % of the time in 9 s spells, longer than three failed checks take (GATEWAY_HEALTH_*
    of `smol`: 1 s; restart after 3): a stream on it still completes, and it is not restarted."""
    server = api_server(smol)
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 128,
            "ignore_eos": True, "stream": True}  # fmt: skip
    tokens, started = 0, time.monotonic()
    with httpx.stream("POST", f"{smol.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        starving: threading.Thread | None = None
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "choices" in event, f"{event}\n{smol.log()[-3000:]}"
            tokens += sum(1 for c in event["choices"] if c["delta"].get("content"))
            if starving is None:  # the stream is under way: starve its worker
                starving = threading.Thread(target=starve, args=(server.pid, 9.0, 2.25, 2))
                starving.start()
        assert starving is not None
        starved_throughout = not starving.is_alive()
        starving.join()
    assert starved_throughout, "the stream ended before the starving did: make it longer"
    assert tokens >= 100, tokens  # every token came (a restart would have cut the stream)
    assert api_server(smol).pid == server.pid, "the busy worker was restarted"
    assert "stopped answering health checks" not in smol.log()
    question = {"model": SMOL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{smol.url}/chat", json=question, timeout=120).status_code == 200
    print(f"\nstarved stream: {tokens} tokens in {time.monotonic() - started:.1f} s")


def test_a_wedged_worker_is_restarted_on_a_fresh_port(smol: Stack) -> None:
    wedged = api_server(smol)
    old_port = port_of(wedged)
    os.kill(wedged.pid, signal.SIGSTOP)  # alive, holding its port, answering nothing
    stopped = time.monotonic()
    deadline = stopped + 120
    while psutil.pid_exists(wedged.pid) and wedged.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, smol.log()[-3000:]
        time.sleep(0.05)
    print(f"\nwedged worker stopped {time.monotonic() - stopped:.1f} s after SIGSTOP")
    squatter = take_port(old_port)  # someone else takes the old port the moment it is free
    try:
        wait_ready(smol)
        replacement = api_server(smol)
        assert replacement.pid != wedged.pid and port_of(replacement) != old_port
        question = {"model": SMOL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = httpx.post(f"{smol.url}/chat", json=question, timeout=120)
        assert answer.status_code == 200, answer.text
    finally:
        squatter.close()
    assert "stopped answering health checks (3 failed in a row)" in smol.log()


def test_the_worker_log_is_rotated_at_its_cap(smol: Stack) -> None:
    logs = Settings().cache_dir / "logs"
    files = sorted(logs.glob(f"{SMOL}-0.log*"))
    assert (logs / f"{SMOL}-0.log") in files and len(files) >= 2, files  # vLLM's start-up alone fills one
    assert all(path.stat().st_size <= SMOL_LOG_CAP for path in files)
    text = "".join(Path(path).read_text(errors="replace") for path in files)
    assert "vllm" in text.lower()
