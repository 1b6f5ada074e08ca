"""The stall corpus: two clients send near-cap inputs of every class whose cost grows with its size
(scoring, tokenizing, token strings, detokenizing, few-shot building, body parsing, worker answers)
to a real gateway process in front of a stand-in worker process, while a third polls /health and
sends ordinary requests. One client must never slow down or take down the service for the others:
/health answers within 0.5 s at the 90th percentile, every ordinary request succeeds (so no worker
was marked down by a probe that timed out on a stalled loop)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.workers.supervisor import free_port
from tests.gateway_process import Stack, launch, stop, wait_ready
from tests.integration.conftest import TOKENIZER

STANDIN = Path(__file__).with_name("standin.py")
ANSWER_CAP = 32 * 1024 * 1024
PROMPT_CHARS = 1_000_000  # the default cap
JSON = {"content-type": "application/json"}
WORDS = "the quick brown fox jumps over the lazy dog "
WRONG = b"[" + b",".join([b"1"] * 1_900_000) + b"]"  # 3.8 MB: under the body cap, one container
ORDINARY = [
    ("/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 4}),
    ("/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    worker_port = free_port("127.0.0.1")
    worker = subprocess.Popen(
        [sys.executable, str(STANDIN), "--port", str(worker_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    models = [
        {"name": name, "kind": kind, "tokenizer": TOKENIZER, "urls": [f"http://127.0.0.1:{worker_port}"]}
        for name, kind in (("base", "base"), ("chat", "instruct"))
    ]
    env = {
        "GATEWAY_MODELS": json.dumps(models),
        "GATEWAY_HEALTH_INTERVAL": "0.5",
        "GATEWAY_HEALTH_TIMEOUT": "1",  # a loop stalled for a second would fail a probe
        "GATEWAY_MAX_ANSWER_BYTES": str(ANSWER_CAP),
        "GATEWAY_LOG_LEVEL": "warning",
    }
    stack = launch(env, tmp_path_factory.mktemp("sizes") / "gateway.log")
    try:
        wait_ready(stack, 120)
        yield stack
    finally:
        stop(stack)
        worker.terminate()
        worker.wait(timeout=30)


def text(chars: int) -> str:
    return (WORDS * (chars // len(WORDS) + 1))[:chars]


def corpus() -> list[tuple[str, str, bytes]]:
    """(name, path, body) of near-cap inputs, one per class of size-bound work."""
    ids = [1000 + i % 40_000 for i in range(131_072)]
    cases: list[tuple[str, str, object]] = [
        ("continuation at the character cap", "/complete",
         {"prompt": "Say:", "continuation": text(PROMPT_CHARS - 4)}),
        ("continuation of 3.9 MB (the issue's case)", "/complete",
         {"prompt": "Say:", "continuation": text(3_900_000)}),
        ("token strings of a prompt at the cap", "/tokenize",
         {"model": "base", "prompt": text(PROMPT_CHARS), "return_token_strs": True}),
        ("detokenize at the cap", "/detokenize", {"model": "base", "tokens": ids}),
        ("echo logprobs of a prompt at the cap", "/v1/completions",
         {"model": "base", "prompt": text(PROMPT_CHARS), "echo": True, "logprobs": 1, "max_tokens": 0}),
        ("few-shot at the cap", "/complete",
         {"prompt": "x", "examples": [{"input": text(3800), "output": text(3800)}] * 128}),
        ("ids at the body cap", "/v1/completions", {"model": "base", "prompt": [7] * 2_000_000}),
        ("invalid ids at the body cap", "/v1/completions", {"model": "base", "prompt": [-1] * 1_300_000}),
        ("a million arrays", "/v1/completions", {"model": "base", "prompt": [[1]] * 1_000_000}),
        ("a wide object at the body cap", "/v1/completions",
         {"model": "base", "prompt": "x", "logit_bias": {str(i): 1 for i in range(330_000)}}),
        ("answer near the cap", "/v1/completions",
         {"model": "base", "prompt": "x", "standin_answer_bytes": ANSWER_CAP - 65_536}),
        ("answer over the cap", "/v1/completions",
         {"model": "base", "prompt": "x", "standin_answer_bytes": ANSWER_CAP + 65_536}),
        # Over the container cap by brackets, then quotes only: counting must stay linear.
        ("quotes after many brackets", "/v1/completions", b"[" * 70_000 + b'"' * 4_000_000),
        # Lists of the wrong type (one container, 1.9 M one-byte items): one error each took 7-22 s.
        ("stop of numbers", "/complete", b'{"prompt":"a","stop":' + WRONG + b"}"),
        ("v1 stop of numbers", "/v1/completions", b'{"model":"base","prompt":"a","stop":' + WRONG + b"}"),
        ("content parts of numbers", "/v1/chat/completions",
         b'{"messages":[{"role":"user","content":' + WRONG + b"}]}"),
        ("native content parts of numbers", "/chat",
         b'{"messages":[{"role":"user","content":' + WRONG + b"}]}"),
        ("tools of numbers", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi"}],"tools":'
         + WRONG + b"}"),
        ("documents of numbers", "/tokenize", b'{"messages":[{"role":"user","content":"hi"}],"documents":'
         + WRONG + b"}"),
        ("batch stop of numbers", "/v1/chat/completions/batch",
         b'{"messages":[[{"role":"user","content":"hi"}]],"stop":' + WRONG + b"}"),
        ("responses input of numbers", "/v1/responses", b'{"input":' + WRONG + b"}"),
        ("unknown fields", "/complete", {"prompt": "a", **{f"x{i}": 1 for i in range(290_000)}}),
        ("unknown fields in a message", "/chat",
         {"messages": [{"role": "user", "content": "hi", **{f"x{i}": 1 for i in range(290_000)}}]}),
    ]  # fmt: skip
    return [
        (name, path, body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode())
        for name, path, body in cases
    ]


def hostile(url: str, cases: list[tuple[str, str, bytes]], until: float, statuses: dict[str, int]) -> None:
    """Send the cases in turn, again and again, until `until` (each at least once)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        sent = 0
        while sent < len(cases) or time.monotonic() < until:
            name, path, body = cases[sent % len(cases)]
            statuses[name] = http.post(path, content=body, headers=JSON).status_code
            sent += 1


def test_near_cap_inputs_of_two_clients_do_not_stall_the_others(gateway: Stack) -> None:
    cases = corpus()
    statuses: dict[str, int] = {}
    until = time.monotonic() + 20
    clients = [
        threading.Thread(target=hostile, args=(gateway.url, cases[offset:] + cases[:offset], until, statuses))
        for offset in (0, len(cases) // 2)
    ]
    health: list[float] = []
    ordinary: list[int] = []
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for client in clients:
            client.start()
        while any(client.is_alive() for client in clients):
            started = time.monotonic()
            assert http.get("/health").status_code == 200
            health.append(time.monotonic() - started)
            if len(health) % 4 == 0:
                for path, body in ORDINARY:
                    ordinary.append(http.post(path, json=body).status_code)
            time.sleep(0.05)
    for client in clients:
        client.join()
    health.sort()
    p90 = health[int(len(health) * 0.9)]
    print(f"/health p50 {health[len(health) // 2]:.3f} s, p90 {p90:.3f} s, worst {health[-1]:.3f} s, "
          f"{len(health)} polls; ordinary requests: {len(ordinary)}; statuses: {statuses}")  # fmt: skip
    assert all(status < 500 or name == "answer over the cap" for name, status in statuses.items()), statuses
    assert statuses["answer near the cap"] == 200 and statuses["answer over the cap"] == 502
    assert p90 < 0.5, f"/health p90 {p90:.2f} s (worst {health[-1]:.2f} s) over {len(health)} polls"
    assert ordinary and set(ordinary) == {200}, ordinary
