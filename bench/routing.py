"""Routing policies on real workers: two SmolLM2 replicas (one core each), 8 tenants each with a
~1,000-token system prompt and short questions, interleaved. For each policy (`prefix`,
`least_outstanding`, `random`; alternating, each round starting from empty prefix caches): time to
first token p50/p90, output tokens/s, and vLLM's own prefix-cache hit rate (from the workers' metrics).

The workers are launched once (as the gateway would launch them); one gateway per policy fronts the
same two workers, so the policies meet identical engines.

    .venv/bin/python -m bench.routing                 # full run (~15 min on 2 cores)
    .venv/bin/python -m bench.routing --quick         # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ROOT, console, gateway_env, percentile, save, stop_all, table, wait_http
from service.ops.settings import Settings, default_models
from service.workers.supervisor import free_port, launch_plan

POLICIES = ("prefix", "least_outstanding", "random")
MODEL = "smollm2-135m-instruct"
TOPICS = ("billing", "shipping", "returns", "warranty", "accounts", "security", "pricing", "support")


def system_prompt(tenant: int, words: int) -> str:
    """A tenant's own long system prompt (~1.3 tokens per word for SmolLM2)."""
    rng = random.Random(tenant)
    vocabulary = ["policy", "customer", "order", "refund", "item", "account", "delivery", "invoice",
                  "support", "agent", "always", "never", "politely", "answer", "check", "confirm"]  # fmt: skip
    body = " ".join(rng.choice(vocabulary) for _ in range(words))
    return f"You are the {TOPICS[tenant]} assistant of tenant {tenant}. Rules: {body}"


def workload(tenants: int, questions: int, words: int, seed: int) -> list[tuple[int, list[dict[str, str]]]]:
    """(tenant, messages) for every request, tenants interleaved in a shuffled order."""
    requests = [
        (tenant, [{"role": "system", "content": system_prompt(tenant, words)},
                  {"role": "user", "content": f"Question {q} about {TOPICS[(tenant + q) % 8]}: what should I do?"}])
        for tenant in range(tenants) for q in range(questions)
    ]  # fmt: skip
    random.Random(seed).shuffle(requests)
    return requests


def start_workers(kv_blocks: int | None) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """Two SmolLM2 workers, one core each, as the gateway launches them (plus the dev-mode route that
    empties the prefix cache between rounds)."""
    settings = Settings()
    spec = default_models()[1]
    extra = ["--num-gpu-blocks-override", str(kv_blocks)] if kv_blocks else []
    spec = spec.model_copy(update={"engine_args": [*spec.engine_args, *extra],
                                   "engine_env": {**spec.engine_env, "VLLM_SERVER_DEV_MODE": "1"}})  # fmt: skip
    processes, urls = [], []
    for replica, core in enumerate(("0", "1")):
        port = free_port("127.0.0.1")
        plan = launch_plan(spec, settings, port, core, replica)
        log = (settings.cache_dir / "logs" / f"bench-routing-{replica}.log").open("wb")
        processes.append(
            subprocess.Popen(plan.argv, env=plan.env, stdout=log, stderr=log, start_new_session=True)
        )
        urls.append(f"http://127.0.0.1:{port}")
    for process, url in zip(processes, urls, strict=True):
        wait_http(f"{url}/health", 900, process)
    return processes, urls


def start_gateway(variant: str, workers: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway routing by `variant`: a policy, or `prefix@<balance factor>`."""
    policy, _, factor = variant.partition("@")
    port = free_port("127.0.0.1")
    tokenizer = Settings().model_dir(MODEL)
    model = {"name": MODEL, "kind": "instruct", "tokenizer": str(tokenizer), "urls": workers,
             "tool_call_parser": "hermes", "routing": policy}  # fmt: skip
    env = gateway_env()
    env.update(GATEWAY_PORT=str(port), GATEWAY_MODELS=json.dumps([model]), GATEWAY_PROCESSES="1",
               GATEWAY_LOG_LEVEL="error", GATEWAY_HEALTH_INTERVAL="1")  # fmt: skip
    if factor:
        env["GATEWAY_ROUTING_BALANCE_FACTOR"] = factor
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", 120, process)
    return process, url


def reasons(gateway: str) -> dict[str, float]:
    """The gateway's routing decisions so far, by reason."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{gateway}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "gateway_routing_decisions_total":
                counts[sample.labels["reason"]] = counts.get(sample.labels["reason"], 0) + sample.value
    return counts


def prefix_cache(workers: list[str]) -> tuple[float, float]:
    """(queries, hits) in tokens, summed over the workers."""
    queries = hits = 0.0
    for url in workers:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == "vllm:prefix_cache_queries_total":
                    queries += sample.value
                elif sample.name == "vllm:prefix_cache_hits_total":
                    hits += sample.value
    return queries, hits


async def run_round(url: str, requests: list[tuple[int, list[dict[str, str]]]], concurrency: int,
                    max_tokens: int, model: str = MODEL) -> dict[str, Any]:  # fmt: skip
    """Closed loop: `concurrency` clients take the next request in order; streamed, so TTFT is seen."""
    queue = list(reversed(requests))
    ttfts: list[float] = []
    tokens = 0
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while queue:
            _, messages = queue.pop()
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
            started = time.perf_counter()
            first = None
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    failures += 1
                    await response.aread()
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - started
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
            if first is not None:
                ttfts.append(first)

    begun = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {"ttfts": ttfts, "tokens": tokens, "wall": time.perf_counter() - begun, "failures": failures}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workers, worker_urls = start_workers(args.kv_blocks)
    policies = POLICIES + tuple(f"prefix@{factor:g}" for factor in args.balance_factors)
    gateways = {policy: start_gateway(policy, worker_urls) for policy in policies}
    results: dict[str, Any] = {}
    turn = 0  # the policies' order alternates from one round to the next, across concurrencies too
    try:
        for concurrency in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in policies}
            for round_index in range(args.rounds):
                order = policies if turn % 2 == 0 else tuple(reversed(policies))
                turn += 1
                for policy in order:
                    for url in worker_urls:  # every policy starts from empty caches
                        httpx.post(f"{url}/reset_prefix_cache", timeout=30).raise_for_status()
                    requests = workload(args.tenants, args.questions, args.words, seed=round_index)
                    before, decided = prefix_cache(worker_urls), reasons(gateways[policy][1])
                    run = asyncio.run(run_round(gateways[policy][1], requests, concurrency, args.max_tokens))
                    after = prefix_cache(worker_urls)
                    now = reasons(gateways[policy][1])
                    run["reasons"] = {
                        k: v - decided.get(k, 0) for k, v in now.items() if v > decided.get(k, 0)
                    }
                    run["cache_queries"], run["cache_hits"] = after[0] - before[0], after[1] - before[1]
                    runs[policy].append(run)
                    console.print(f"c={concurrency} round {round_index} {policy}: "
                                  f"TTFT p50 {percentile(run['ttfts'], 50):.3f} s, "
                                  f"hit rate {run['cache_hits'] / max(1, run['cache_queries']):.2f}")  # fmt: skip
            results[f"c={concurrency}"] = {policy: summarize(runs[policy]) for policy in policies}
    finally:
        stop_all([process for process, _ in gateways.values()], workers)
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [x for run in runs for x in run["ttfts"]]
    wall = sum(run["wall"] for run in runs)
    return {
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "output_tokens_per_s": sum(run["tokens"] for run in runs) / wall,
        "prefix_cache_hit_rate": sum(r["cache_hits"] for r in runs)
        / max(1.0, sum(r["cache_queries"] for r in runs)),
        "requests": len(ttfts),
        "reasons": {
            k: sum(run["reasons"].get(k, 0) for run in runs) for k in {k for r in runs for k in r["reasons"]}
        },
        "failures": sum(run["failures"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds per policy and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--questions", type=int, default=3, help="questions per tenant per round")
    parser.add_argument("--words", type=int, default=760, help="system prompt words (~1,000 tokens)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=48,
                        help="KV-cache blocks (128 tokens) per worker; 0: vLLM's own size from its memory")  # fmt: skip
    parser.add_argument("--balance-factors", type=float, nargs="*", default=[],
                        help="also prefix routing with these GATEWAY_ROUTING_BALANCE_FACTOR values")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.concurrency, args.tenants, args.questions, args.words = 1, [2], 4, 2, 200
    results = measure(args)
    rows = []
    for scenario, by_policy in results.items():
        for policy, r in by_policy.items():
            spread = ", ".join(f"{k} {v:g}" for k, v in sorted(r["reasons"].items()))
            rows.append([scenario, policy, r["ttft_p50_s"], r["ttft_p90_s"], r["output_tokens_per_s"],
                         r["prefix_cache_hit_rate"], r["requests"], r["failures"], spread])  # fmt: skip
    table("Routing policies, two SmolLM2 replicas (TTFT in s)",
          ["scenario", "policy", "TTFT p50", "TTFT p90", "output tok/s", "vLLM prefix hit rate", "requests",
           "failures", "routing reasons"], rows)  # fmt: skip
    path = save("routing" if not args.quick else "routing-quick", {"args": vars(args), "results": results})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
