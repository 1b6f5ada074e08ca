"""A registration reaches every gateway process of a host within a second: two serving processes on one
port (one supervising a stand-in engine), an adapter registered through whichever answers, then served
by both, and gone from both once removed."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.ops.settings import Settings
from tests.adapters import adapter_folder
from tests.gateway_process import Stack, launch, stop, wait_ready
from tests.integration.conftest import TOKENIZER
from tests.integration.test_processes import served_by

STANDIN = Path(__file__).with_name("standin.py")
ADMIN = {"Authorization": "Bearer admin-1"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("adapter-processes")
    engine = folder / "fake-python"
    engine.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {STANDIN} "$@"\n')
    engine.chmod(0o755)
    model = {"name": "fake", "kind": "base", "source": str(folder), "lora": True,
             "tokenizer": Settings().resolve_source(TOKENIZER)}  # fmt: skip
    env = {
        "GATEWAY_PROCESSES": "2", "GATEWAY_MODELS": json.dumps([model]),
        "GATEWAY_ENGINE_PYTHON": str(engine), "GATEWAY_CACHE_DIR": str(folder),
        "GATEWAY_HEALTH_INTERVAL": "0.2", "GATEWAY_ADMIN_KEYS": "admin-1", "GATEWAY_LOG_FORMAT": "text",
    }  # fmt: skip
    started = launch(env, folder / "gateway.log")
    try:
        wait_ready(started, seconds=60)
        yield started
    finally:
        stop(started)


def complete(gateway: Stack, model: str) -> tuple[httpx.Response, str]:
    """A completion on a new connection, and the serving process that answered it (its pid)."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 4}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        answer = client.post("/v1/completions", json=body)
        port = answer.extensions["network_stream"].get_extra_info("client_addr")[1]
        return answer, str(served_by(gateway, port))


def answered_by_both(gateway: Stack, model: str, status: int) -> tuple[float, set[str]]:
    """Requests one after another until 20 in a row, from both processes, answer `status`: how long after
    the first request the last other answer came, and which processes answered (their pids)."""
    started = time.monotonic()
    last_other = started
    streak: list[str] = []
    while len(streak) < 20 or len(set(streak)) < 2:
        assert time.monotonic() - started < 10, f"{model}: not {status} from both: {gateway.log()[-3000:]}"
        answer, process = complete(gateway, model)
        if answer.status_code == status:
            streak.append(process)
        else:
            last_other, streak = time.monotonic(), []
    return last_other - started, set(streak)


def test_every_process_serves_a_registration_within_a_second(gateway: Stack, tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path, "shared")
    body = {"model": "fake", "name": "shared", "path": str(folder)}
    _, processes = answered_by_both(gateway, "shared", 404)
    added = httpx.post(f"{gateway.url}/adapters", json=body, headers=ADMIN, timeout=30)
    assert added.status_code == 200, added.text
    seconds, serving = answered_by_both(gateway, "shared", 200)
    print(f"registration served by both processes after {seconds:.2f} s")
    assert seconds < 1.5 and serving == processes  # the same processes: they poll the store every second
    models = httpx.get(f"{gateway.url}/v1/models", timeout=5).json()["data"]
    assert any(m["id"] == "shared" and m["parent"] == "fake" for m in models)
    removed = httpx.delete(f"{gateway.url}/adapters/shared", headers=ADMIN, timeout=10)
    assert removed.status_code == 200
    seconds, serving = answered_by_both(gateway, "shared", 404)
    assert seconds < 1.5 and serving == processes
