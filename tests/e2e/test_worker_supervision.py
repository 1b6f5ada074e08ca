"""Supervision of a real vLLM worker on a gateway of its own (SmolLM2 only, so restarting it does
not disturb the shared stack): a worker that wedges (alive, not answering) is restarted; the new
process takes a fresh port while someone else holds the old one; its log is rotated at the cap."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from service.settings import Settings, default_models
from service.supervisor import free_port
from tests.e2e.conftest import Stack, wait_ready

NAME = "smol-supervised"
LOG_CAP = 6_000  # vLLM's start-up output alone is ~16 KB


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    spec = default_models()[1].model_copy(update={"name": NAME}).model_dump(mode="json")
    port = free_port("127.0.0.1")
    log_path = tmp_path_factory.mktemp("smol") / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_PORT=str(port), GATEWAY_MODELS=json.dumps([spec]), GATEWAY_HEALTH_INTERVAL="1",
        GATEWAY_HEALTH_TIMEOUT="1", GATEWAY_WORKER_RESTART_AFTER_FAILED_CHECKS="3",
        GATEWAY_RESTART_BACKOFF_INITIAL="1", GATEWAY_WORKER_LOG_MAX_BYTES=str(LOG_CAP),
        GATEWAY_WORKER_CPU_BINDING="false",
    )  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    stack = Stack(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:
        wait_ready(stack)
        yield stack
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


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


def test_a_wedged_worker_is_restarted_on_a_fresh_port(smol: Stack) -> None:
    wedged = api_server(smol)
    old_port = port_of(wedged)
    os.kill(wedged.pid, signal.SIGSTOP)  # alive, holding its port, answering nothing
    deadline = time.monotonic() + 120
    while psutil.pid_exists(wedged.pid) and wedged.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, smol.log()[-3000:]
        time.sleep(0.05)
    squatter = take_port(old_port)  # someone else takes the old port the moment it is free
    try:
        wait_ready(smol)
        replacement = api_server(smol)
        assert replacement.pid != wedged.pid and port_of(replacement) != old_port
        question = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = httpx.post(f"{smol.url}/chat", json=question, timeout=120)
        assert answer.status_code == 200, answer.text
    finally:
        squatter.close()
    assert "stopped answering health checks (3 failed in a row)" in smol.log()


def test_the_worker_log_is_rotated_at_its_cap(smol: Stack) -> None:
    logs = Settings().cache_dir / "logs"
    files = sorted(logs.glob(f"{NAME}-0.log*"))
    assert (logs / f"{NAME}-0.log") in files and len(files) >= 2, files  # vLLM's start-up alone fills one
    assert all(path.stat().st_size <= LOG_CAP for path in files)
    text = "".join(Path(path).read_text(errors="replace") for path in files)
    assert "vllm" in text.lower()
