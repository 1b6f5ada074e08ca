"""Prefix routing with two real SmolLM2 replicas behind two gateway processes: requests that share a
long prefix are served by one replica, which finds the prefix in vLLM's own prefix cache."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import OPERATOR, PAIR, Stack

# ~700 tokens of a tenant's system prompt: five whole KV blocks of 128 tokens on the CPU build.
SYSTEMS = [
    " ".join(f"Rule {i}: tenant {tenant} answers politely about item {i * 7 % 97}." for i in range(60))
    for tenant in ("acme", "globex")
]
QUESTIONS = ["What is the first rule?", "Name one item."]


def prefix_cache(worker_url: str, key: str | None = None) -> tuple[float, float]:
    """(queries, hits) of a worker's prefix cache, in tokens, from its own /metrics (which takes the
    workers' `key` when they have one)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(f"{worker_url}/metrics", headers=headers, timeout=10).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
    }
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


def gateway_counters(stack: Stack, name: str) -> dict[tuple[str, ...], float]:
    text = httpx.get(f"{stack.url}/metrics", headers=OPERATOR, timeout=10).text
    return {
        tuple(sorted(sample.labels.items())): sample.value  # type: ignore[misc]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


@pytest.fixture(scope="module")
def oai(pair: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{pair.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_a_shared_prefix_is_served_by_one_replica_from_its_prefix_cache(
    pair: Stack, oai: openai.OpenAI
) -> None:
    workers = pair.worker_urls()
    assert len(workers) == 2
    decided_before = gateway_counters(pair, "gateway_routing_decisions_total")
    served: dict[int, list[str]] = {}
    hits_on_second: dict[int, float] = {}
    for tenant, system in enumerate(SYSTEMS):
        for turn, question in enumerate(QUESTIONS):
            before = {url: prefix_cache(url) for url in workers}
            answer = oai.chat.completions.create(
                model=PAIR,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                max_tokens=1,
            )
            assert answer.usage is not None and answer.usage.prompt_tokens > 640
            after = {url: prefix_cache(url) for url in workers}
            grown = [url for url in workers if after[url][0] > before[url][0]]
            assert len(grown) == 1, (before, after)
            worker = grown[0]  # who prefilled it
            served.setdefault(tenant, []).append(worker)
            if turn == 1:
                hits_on_second[tenant] = after[worker][1] - before[worker][1]
    for tenant in served:
        assert len(set(served[tenant])) == 1, served  # both questions on the same replica
        assert hits_on_second[tenant] >= 640, hits_on_second  # and the second found 5+ blocks cached
    decisions = gateway_counters(pair, "gateway_routing_decisions_total")
    reasons = {
        dict(labels)["reason"] for labels, value in decisions.items() if value > decided_before.get(labels, 0)
    }
    assert reasons <= {"prefix_hash", "prefix_match"} and all(
        dict(labels)["policy"] == "prefix" for labels in decisions
    )
    assert sum(gateway_counters(pair, "gateway_worker_prefix_cache_hits_total").values()) > 0
