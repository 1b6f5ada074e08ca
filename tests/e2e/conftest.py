"""The real embedded stack, started once per session: `llm-gateway serve` launching vLLM CPU
workers with the two packaged models (prepared by `make test` before pytest runs)."""

from __future__ import annotations

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

from service.settings import Settings
from service.supervisor import free_port

READY_TIMEOUT_SECONDS = 900
BASE_MODEL = "gemma-3-270m"
INSTRUCT_MODEL = "smollm2-135m-instruct"


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


def wait_ready(stack: Stack) -> None:
    """Until /ready says 200 (fails with the gateway's log tail if it exits or takes too long)."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if stack.process.poll() is not None:
            pytest.fail(f"gateway exited with {stack.process.returncode}:\n{stack.log()[-4000:]}")
        try:
            if httpx.get(f"{stack.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"gateway not ready after {READY_TIMEOUT_SECONDS} s:\n{stack.log()[-4000:]}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The gateway with both default models on embedded workers, ready to serve."""
    port = free_port("127.0.0.1")
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_PORT=str(port), GATEWAY_HEALTH_INTERVAL="1", GATEWAY_RESTART_BACKOFF_INITIAL="1",
        GATEWAY_DRAIN_ACCEPT_WINDOW="2",
    )  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    stack = Stack(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    started = time.monotonic()
    try:
        wait_ready(stack)
        print(f"\nembedded stack ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield stack
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[httpx.Client]:
    """HTTP client bound to the running gateway."""
    with httpx.Client(base_url=stack.url, timeout=300) as http:
        yield http


@pytest.fixture(scope="session")
def model_dirs() -> dict[str, Path]:
    """Prepared folders of the built-in models (what the workers load)."""
    settings = Settings()
    return {name: settings.model_dir(name) for name in (BASE_MODEL, INSTRUCT_MODEL)}
