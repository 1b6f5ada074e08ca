"""A gateway run as its own process, as `llm-gateway serve` (its log in a file), for the tiers that
test the whole program: start it, wait until it is ready, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from service.workers.supervisor import free_port

READY_TIMEOUT_SECONDS = 900  # real workers: vLLM's start-up on 2 CPU cores


@dataclass
class Stack:
    """A running gateway process and how to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def worker_processes(self) -> list[psutil.Process]:
        """The vLLM API server processes the gateway launched."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if _is_api_server(p)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_urls(self) -> list[str]:
        """Where every worker listens, read from their command lines."""
        urls = []
        for process in self.worker_processes():
            argv = process.cmdline()
            urls.append(f"http://127.0.0.1:{argv[argv.index('--port') + 1]}")
        return sorted(urls)

    def worker_url(self, model: str) -> str:
        """Where the (first) worker of `model` listens, read from its command line."""
        for process in self.worker_processes():
            argv = process.cmdline()
            if argv[argv.index("--served-model-name") + 1] == model:
                return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
        raise AssertionError(f"no worker process for {model}")


def _is_api_server(process: psutil.Process) -> bool:
    try:
        return "vllm.entrypoints.openai.api_server" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(stack: Stack, seconds: float = READY_TIMEOUT_SECONDS) -> None:
    """Until /ready says 200 (fails with the gateway's log tail if it exits or takes too long)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stack.process.poll() is not None:
            pytest.fail(f"gateway exited with {stack.process.returncode}:\n{stack.log()[-4000:]}")
        try:
            if httpx.get(f"{stack.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"gateway not ready after {seconds:g} s:\n{stack.log()[-4000:]}")


def launch(env_overrides: dict[str, str], log_path: Path) -> Stack:
    """`llm-gateway serve` with a clean GATEWAY_* environment plus `env_overrides`."""
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # A store of its own next to its log: never the user's, and nothing left from an earlier run.
    store = log_path.with_name(f"{log_path.stem}.db")
    env.update(GATEWAY_PORT=str(port), GATEWAY_PROCESSES="1", GATEWAY_DATABASE_URL=f"sqlite:///{store}")
    env.update(env_overrides)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    return Stack(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)


def stop(stack: Stack) -> None:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.process.kill()
