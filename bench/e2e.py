"""End to end on real vLLM: the embedded workers called directly and through the gateway on the
same workload (random ~128-token prompts, 64 output tokens with ignore_eos, concurrency 1 and 4),
alternating rounds. Also measures cold start (`make run` to /ready, models already prepared) and the
gateway's memory idle and under load.

    .venv/bin/python -m bench.e2e                  # writes bench/results/e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import time
from typing import Any

import aiohttp
import psutil

from bench import startup
from bench.common import ROOT, console, gateway_env, percentile, save, table
from service.workers.supervisor import free_port

MODEL = "smollm2-135m-instruct"
WORDS = [
    "river",
    "stone",
    "light",
    "paper",
    "window",
    "garden",
    "music",
    "engine",
    "silver",
    "forest",
    "market",
    "number",
    "yellow",
    "winter",
    "doctor",
    "island",
    "pocket",
    "bridge",
    "thunder",
    "orange",
]


def random_prompt(rng: random.Random, words: int = 110) -> str:
    """About 128 tokens of random words (SmolLM2's tokenizer: ~1.15 tokens per word here)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    ended = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": stamps[0] - started, "gaps": gaps, "e2e": ended - started, "tokens": tokens}


async def run(url: str, concurrency: int, requests: int, max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [
        {
            "model": MODEL,
            "prompt": random_prompt(rng),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(requests)
    ]
    queue = list(bodies)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def client() -> None:
            while queue:
                results.append(await one(session, url, queue.pop()))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"results": results, "wall": wall}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    results = [r for run_ in runs for r in run_["results"]]
    gaps = [g for r in results for g in r["gaps"]]
    wall = sum(run_["wall"] for run_ in runs)
    return {
        "ttft_p50_ms": percentile([r["ttft"] for r in results], 50) * 1e3,
        "ttft_p99_ms": percentile([r["ttft"] for r in results], 99) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "e2e_p50_ms": percentile([r["e2e"] for r in results], 50) * 1e3,
        "e2e_p99_ms": percentile([r["e2e"] for r in results], 99) * 1e3,
        "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
    }


def compare(
    gateway_url: str,
    worker_url: str,
    concurrency: int,
    requests: int,
    rounds: int,
    max_tokens: int = 64,
    on_gateway_round: Any = None,
) -> dict[str, Any]:
    """Alternate direct and gateway rounds of the same workload; summarize both and their ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    for index in range(rounds):
        for target, url in (("direct", worker_url), ("gateway", gateway_url)):
            runs[target].append(asyncio.run(run(url, concurrency, requests, max_tokens, seed=index)))
            if target == "gateway" and on_gateway_round is not None:
                on_gateway_round()
    direct, through = summarize(runs["direct"]), summarize(runs["gateway"])
    return {
        "direct": direct,
        "gateway": through,
        "ttft_p50_ratio": through["ttft_p50_ms"] / direct["ttft_p50_ms"],
        "tokens_per_s_ratio": through["output_tokens_per_s"] / direct["output_tokens_per_s"],
    }


def worker_url_of(gateway_pid: int, model: str) -> str:
    """Where the gateway's embedded worker for `model` listens (read from its command line: the
    gateway publishes names, not addresses)."""
    for child in psutil.Process(gateway_pid).children(recursive=True):
        argv = child.cmdline()
        if "--served-model-name" in argv and argv[argv.index("--served-model-name") + 1] == model:
            return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    raise LookupError(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8, help="requests per round and concurrency")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cold-start-only", action="store_true", help="measure make run -> /ready and stop")
    args = parser.parse_args()
    port = free_port("127.0.0.1")
    env = gateway_env()
    env.update(GATEWAY_PORT=str(port), GATEWAY_LOG_LEVEL="warning")
    make = subprocess.Popen(
        ["make", "-s", "run"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        cold = startup.measure(make, f"{url}/ready")
        cold_start = cold.seconds
        console.print(f"cold start (make run -> /ready): {cold_start:.1f} s")
        table("Cold start: CPU seconds by process", ["process", "started at s", "CPU s"], startup.rows(cold))
        if args.cold_start_only:
            return
        gateway = next(
            p
            for p in psutil.Process(make.pid).children(recursive=True)
            if "service.cli" in " ".join(p.cmdline()) or "llm-gateway" in " ".join(p.cmdline())
        )
        idle_rss = gateway.memory_info().rss
        peak = [idle_rss]
        worker = worker_url_of(gateway.pid, MODEL)
        results = {}
        for concurrency in (1, 4):
            results[f"c={concurrency}"] = compare(
                url,
                worker,
                concurrency,
                args.requests * concurrency // max(1, concurrency // 2),
                args.rounds,
                on_gateway_round=lambda: peak.append(gateway.memory_info().rss),
            )
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=120)
    rows = []
    for name, r in results.items():
        d, g = r["direct"], r["gateway"]
        rows.append(
            [
                name,
                d["ttft_p50_ms"],
                g["ttft_p50_ms"],
                r["ttft_p50_ratio"],
                d["itl_p50_ms"],
                g["itl_p50_ms"],
                d["e2e_p50_ms"],
                g["e2e_p50_ms"],
                d["e2e_p99_ms"],
                g["e2e_p99_ms"],
                d["output_tokens_per_s"],
                g["output_tokens_per_s"],
                r["tokens_per_s_ratio"],
            ]
        )
    table(
        f"Real vLLM ({MODEL}), direct vs gateway (ms; tokens per second)",
        [
            "load",
            "TTFT p50 d",
            "TTFT p50 g",
            "ratio",
            "ITL p50 d",
            "ITL p50 g",
            "E2E p50 d",
            "E2E p50 g",
            "E2E p99 d",
            "E2E p99 g",
            "tok/s d",
            "tok/s g",
            "ratio",
        ],
        rows,
    )
    memory = {"idle_rss_mib": idle_rss / 2**20, "loaded_rss_mib": max(peak) / 2**20}
    console.print(
        f"gateway RSS: idle {memory['idle_rss_mib']:.0f} MiB, under load {memory['loaded_rss_mib']:.0f} MiB"
    )
    console.print(f"wrote {save('e2e', {'cold_start_s': cold_start, 'memory': memory, 'results': results})}")


if __name__ == "__main__":
    main()
