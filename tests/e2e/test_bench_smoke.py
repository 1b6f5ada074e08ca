"""The real-vLLM benchmark's measuring code, briefly, against the running stack: it cannot rot."""

from __future__ import annotations

import asyncio

from bench.e2e import MODEL, compare, worker_url_of
from bench.routing import prefix_cache, run_round, workload
from tests.e2e.conftest import PAIR, Stack


def test_e2e_benchmark_measures_both_paths(stack: Stack) -> None:
    report = compare(
        stack.url, worker_url_of(stack.process.pid, MODEL), concurrency=1, requests=1, rounds=1, max_tokens=4
    )
    for target in ("direct", "gateway"):
        numbers = report[target]
        assert 0 < numbers["ttft_p50_ms"] <= numbers["e2e_p50_ms"]
        assert numbers["output_tokens_per_s"] > 0
    assert report["ttft_p50_ratio"] > 0 and report["tokens_per_s_ratio"] > 0


def test_routing_benchmark_measures_a_round(pair: Stack) -> None:
    requests = workload(tenants=2, questions=1, words=20, seed=0)
    before = prefix_cache(pair.worker_urls())
    run = asyncio.run(run_round(pair.url, requests, concurrency=2, max_tokens=2, model=PAIR))
    after = prefix_cache(pair.worker_urls())
    assert run["failures"] == 0 and len(run["ttfts"]) == 2 and run["tokens"] == 4
    assert after[0] > before[0]  # the workers' own prefix-cache counters moved
