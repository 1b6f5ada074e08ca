"""A very large non-streamed answer through the gateway: what it costs the gateway's memory and its
event loop. A stand-in upstream answers /v1/completions with a vLLM-shaped answer of `--mb` megabytes
(1,024 choices with top-20 logprobs, as `echo` + `logprobs` on a batch makes); the gateway (the code
under `--root`, so two checkouts can be compared) passes it on while a poller times /health.

    .venv/bin/python -m bench.large_answer                      # this checkout, a 70 MB answer
    .venv/bin/python -m bench.large_answer --root /tmp/main-bench --no-save   # another checkout
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn

from bench.asgi import read_body
from bench.common import ROOT, console, gateway_env, save, table, wait_http
from service.workers.supervisor import free_port

MODELS = json.dumps({"object": "list", "data": [{"id": "m", "max_model_len": 4096}]}).encode()
TOP = {f" tok{i}": -1.0 - i / 8 for i in range(20)}


def vllm_answer(megabytes: float, prompts: int = 1024) -> bytes:
    """A completions answer of about `megabytes` MB: `prompts` choices with top-20 logprobs per token."""

    def choice(index: int, tokens: int) -> dict[str, Any]:
        return {"index": index, "text": " tok" * tokens, "finish_reason": "length", "stop_reason": None,
                "logprobs": {"text_offset": list(range(tokens)), "token_logprobs": [-0.5] * tokens,
                             "tokens": [" tok"] * tokens, "top_logprobs": [TOP] * tokens}}  # fmt: skip

    per_token = len(json.dumps(choice(0, 101), separators=(",", ":"))) - len(json.dumps(choice(0, 1)))
    tokens = max(1, int(megabytes * 1e6 / prompts / (per_token / 100)))
    usage = {
        "prompt_tokens": prompts * 8,
        "completion_tokens": prompts * tokens,
        "total_tokens": prompts * (tokens + 8),
    }
    answer = {"id": "cmpl-large", "object": "text_completion", "created": 0, "model": "m",
              "choices": [choice(i, tokens) for i in range(prompts)], "usage": usage}  # fmt: skip
    return json.dumps(answer, separators=(",", ":")).encode()


def serve_upstream(port: int, megabytes: float) -> None:
    """The stand-in: the large answer for every POST, /health and /v1/models for the gateway."""
    answer = vllm_answer(megabytes)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await read_body(receive)
        body = MODELS if scope["path"] == "/v1/models" else b"" if scope["path"] == "/health" else answer
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start(root: Path, megabytes: float) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str]:
    upstream_port, gateway_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.large_answer",
            "--serve-upstream",
            str(upstream_port),
            "--mb",
            str(megabytes),
        ],
        cwd=ROOT,
    )
    wait_http(f"http://127.0.0.1:{upstream_port}/health", 120, upstream)
    tokenizer = str(Path.home() / ".cache" / "llm-gateway" / "models" / "smollm2-135m-instruct")
    models = [
        {"name": "m", "kind": "base", "tokenizer": tokenizer, "urls": [f"http://127.0.0.1:{upstream_port}"]}
    ]
    env = gateway_env()
    env.update(GATEWAY_PORT=str(gateway_port), GATEWAY_MODELS=json.dumps(models), GATEWAY_PROCESSES="1",
               GATEWAY_LOG_LEVEL="warning", PYTHONPATH=str(root))  # fmt: skip
    gateway = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], cwd=root, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{gateway_port}"
    wait_http(f"{url}/ready", 120, gateway)
    return upstream, gateway, url


def watch(url: str, pid: int, stop: Any, report: Any) -> None:
    """In its own process (so the client's work cannot delay it): /health timed in a loop, and the
    gateway's RSS sampled every 5 ms by another thread (a slow /health must not pause the sampling),
    until `stop` is set; then (worst wait, polls, peak RSS)."""
    process = psutil.Process(pid)
    peak, waits = process.memory_info().rss, []

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with httpx.Client(base_url=url, timeout=30) as poller:
        while not stop.is_set():
            started = time.monotonic()
            poller.get("/health")
            waits.append(time.monotonic() - started)
            time.sleep(0.01)
    sampler.join()
    report.put((max(waits), len(waits), peak))


def measure(url: str, pid: int, requests: int) -> dict[str, Any]:
    """RSS before, at peak and after `requests` large answers; the longest /health wait meanwhile."""
    process = psutil.Process(pid)
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    with httpx.Client(base_url=url, timeout=120) as http:
        http.post("/v1/completions", json=body)  # warm up every path once
        time.sleep(1)
        before = process.memory_info().rss
        stop = multiprocessing.Event()
        report: multiprocessing.Queue[tuple[float, int, int]] = multiprocessing.Queue()
        watcher = multiprocessing.Process(target=watch, args=(url, pid, stop, report))
        watcher.start()
        time.sleep(0.5)
        sizes, took = [], []
        for _ in range(requests):
            started = time.monotonic()
            response = http.post("/v1/completions", json=body)
            took.append(time.monotonic() - started)
            sizes.append(len(response.content))
        stop.set()
        worst, polls, peak = report.get(timeout=60)
        watcher.join()
        time.sleep(1)
        after = process.memory_info().rss
    mib = 1 << 20
    return {"answer_mb": sizes[-1] / 1e6, "requests": requests, "rss_before_mib": before / mib,
            "rss_peak_mib": peak / mib, "rss_after_mib": after / mib, "health_worst_s": worst,
            "health_polls": polls, "request_s": sum(took) / len(took)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose gateway is measured")
    parser.add_argument("--mb", type=float, default=70.0, help="answer size in MB")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/large_answer.json")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.mb)
        return
    upstream, gateway, url = start(args.root.resolve(), args.mb)
    try:
        result = measure(url, gateway.pid, args.requests)
    finally:
        for child in (gateway, upstream):
            child.terminate()
            child.wait(timeout=30)
    result["root"] = "this checkout" if args.root.resolve() == ROOT else str(args.root)
    table("A large answer through the gateway", list(result), [list(result.values())])
    if not args.no_save:
        console.print(f"saved {save('large_answer', result)}")


if __name__ == "__main__":
    main()
