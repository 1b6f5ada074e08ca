"""The real-vLLM benchmark's measuring code, briefly, against the running stack: it cannot rot."""

from __future__ import annotations

from bench.e2e import MODEL, compare, worker_url_of
from tests.e2e.conftest import Stack


def test_e2e_benchmark_measures_both_paths(stack: Stack) -> None:
    report = compare(
        stack.url, worker_url_of(stack.process.pid, MODEL), concurrency=1, requests=1, rounds=1, max_tokens=4
    )
    for target in ("direct", "gateway"):
        numbers = report[target]
        assert 0 < numbers["ttft_p50_ms"] <= numbers["e2e_p50_ms"]
        assert numbers["output_tokens_per_s"] > 0
    assert report["ttft_p50_ratio"] > 0 and report["tokens_per_s_ratio"] > 0
