"""A bounded load test on loopback: 10x the gateway's capacity for a fixed time. Only 200s and clean
503s (envelope + Retry-After) come back, the gateway survives, and its memory returns near baseline.
The gateway runs as its own process (so its memory is its own), in front of a slow stand-in worker."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from bench.common import gateway_env
from service.ops.settings import Settings
from service.workers.supervisor import free_port
from tests.gateway_process import TEST_STORE
from tests.integration.conftest import TOKENIZER
from tests.promtext import parse, value

STANDIN = Path(__file__).with_name("standin.py")
PER_WORKER, QUEUE = 4, 8
CONCURRENCY = 10 * (PER_WORKER + QUEUE)
SECONDS = float(os.environ.get("LOAD_TEST_SECONDS", "20"))


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        assert process.poll() is None, "process exited during start-up"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready")


@pytest.fixture(scope="module")
def loaded_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, psutil.Process]]:
    worker_port, port = free_port("127.0.0.1"), free_port("127.0.0.1")
    worker_env = {**os.environ, "STANDIN_FIRST_TOKEN_DELAY": "0.05", "STANDIN_TOKEN_DELAY": "0.02"}
    worker = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(worker_port)], env=worker_env)
    tokenizer = Settings().resolve_source(TOKENIZER)
    models = [
        {"name": "base", "kind": "base", "tokenizer": tokenizer, "urls": [f"http://127.0.0.1:{worker_port}"]}
    ]
    env = gateway_env(TEST_STORE)
    env.update(
        GATEWAY_PORT=str(port), GATEWAY_MODELS=json.dumps(models), GATEWAY_LOG_LEVEL="warning",
        GATEWAY_MAX_IN_FLIGHT_PER_WORKER=str(PER_WORKER), GATEWAY_MAX_QUEUE_PER_MODEL=str(QUEUE),
        GATEWAY_QUEUE_TIMEOUT="0.5", GATEWAY_PROCESSES="1",
    )  # fmt: skip
    with (tmp_path_factory.mktemp("load") / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=log
        )
    try:
        _wait_ready(f"http://127.0.0.1:{worker_port}/health", worker)
        _wait_ready(f"http://127.0.0.1:{port}/ready", gateway)
        yield f"http://127.0.0.1:{port}", psutil.Process(gateway.pid)
    finally:
        for process in (gateway, worker):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


async def _hammer(url: str, seconds: float) -> Counter[tuple[int, str]]:
    outcomes: Counter[tuple[int, str]] = Counter()
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        deadline = time.monotonic() + seconds

        async def user(index: int) -> None:
            body = {"prompt": "x", "max_tokens": 4, "stream": index % 2 == 0}
            while time.monotonic() < deadline:
                response = await client.post("/complete", json=body)
                code = ""
                if response.status_code != 200:
                    code = str(response.json()["error"]["code"])
                    assert response.headers.get("retry-after") == "1"
                elif body["stream"]:
                    assert response.text.endswith("data: [DONE]\n\n")
                outcomes[(response.status_code, code)] += 1

        await asyncio.gather(*(user(i) for i in range(CONCURRENCY)))
    return outcomes


def test_ten_times_capacity_gets_only_200s_and_clean_503s(loaded_gateway: tuple[str, psutil.Process]) -> None:
    url, process = loaded_gateway
    asyncio.run(_hammer(url, 3))  # warm up: imports, pools, caches
    baseline = process.memory_info().rss
    outcomes = asyncio.run(_hammer(url, SECONDS))
    after = process.memory_info().rss
    print(f"\nload: {dict(outcomes)} in {SECONDS:g} s; RSS {baseline / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert set(outcomes) <= {(200, ""), (503, "overloaded")}, outcomes
    assert outcomes[(200, "")] > 0 and outcomes[(503, "overloaded")] > 0
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    samples = parse(httpx.get(f"{url}/metrics").text)
    assert value(samples, "gateway_requests_in_flight", model="base") == 0
    assert after - baseline < 64 * 2**20, (baseline, after)


def test_idle_connections_outlive_uvicorns_default_keep_alive(
    loaded_gateway: tuple[str, psutil.Process],
) -> None:
    """uvicorn closes idle connections after 5 s by default; a client (or load balancer) that reuses one
    just then gets a reset instead of an answer. The gateway keeps them for GATEWAY_KEEP_ALIVE_TIMEOUT."""
    url, _ = loaded_gateway
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/health")
        first = connection.getresponse()
        first.read()
        socket_before = connection.sock
        time.sleep(6)
        connection.request("GET", "/health")  # on the same socket: http.client reconnects only if closed
        second = connection.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200)
        assert connection.sock is socket_before and second.getheader("connection") != "close"
    finally:
        connection.close()
