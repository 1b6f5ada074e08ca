"""The cross-tenant probe against a real SmolLM2 worker: with API keys, key B's exact guess of key A's
long prompt finds nothing of A's in vLLM's prefix cache (as slow as a wrong guess), while A finds its
own and a key the operator grouped with A finds A's. The worker itself runs with its own API key
(`GATEWAY_WORKER_API_KEY`): the gateway's requests and probes pass, a direct request does not."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.tenancy import key_id
from service.ops.settings import default_models
from tests.e2e.test_routing import prefix_cache
from tests.gateway_process import Stack, launch, stop, wait_ready

MODEL = "smol-tenants"
WORKER_KEY = "worker-only-secret"
KEYS = {"a": "key-of-tenant-a", "b": "key-of-tenant-b", "c": "key-grouped-with-a"}
WORDS = ["river", "stone", "lantern", "orchard", "copper", "violet",
         "meadow", "harbor", "signal", "quiet", "amber", "thunder"]  # fmt: skip


def long_prompt(seed: int, words: int = 1400) -> str:
    """A prompt of about 1,400 SmolLM2 tokens, different from the first word for each seed."""
    rng = random.Random(seed)
    return f"Memo {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway with three keys (a and c in one cache group) in front of one SmolLM2 worker that
    requires its own key."""
    spec = default_models()[1].model_copy(update={"name": MODEL})
    env = {
        "GATEWAY_MODELS": json.dumps([spec.model_dump(mode="json")]),
        "GATEWAY_API_KEYS": ",".join(KEYS.values()),
        "GATEWAY_CACHE_GROUPS": json.dumps({"team-a": [key_id(KEYS["a"]), key_id(KEYS["c"])]}),
        "GATEWAY_WORKER_API_KEY": WORKER_KEY,
        "GATEWAY_HEALTH_INTERVAL": "1",
        "GATEWAY_WORKER_CPU_BINDING": "false",
    }
    stack = launch(env, Path(tmp_path_factory.mktemp("tenants")) / "gateway.log")
    try:
        wait_ready(stack)
        yield stack
    finally:
        stop(stack)


def probe(stack: Stack, key: str, prompt: str) -> tuple[float, float, int]:
    """Send `prompt` as `key`: (seconds to the answer, prefix-cache hit tokens on the worker, prompt
    tokens). One token is generated, so the time is the prefill's."""
    worker = stack.worker_url(MODEL)
    _, hits_before = prefix_cache(worker)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    answer = httpx.post(
        f"{stack.url}/v1/completions",
        json=body,
        headers={"authorization": f"Bearer {KEYS[key]}"},
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    _, hits_after = prefix_cache(worker)
    return elapsed, hits_after - hits_before, int(answer.json()["usage"]["prompt_tokens"])


def test_another_keys_exact_guess_is_as_slow_as_a_wrong_one(tenants: Stack) -> None:
    secret, wrong = long_prompt(1), long_prompt(2)
    probe(tenants, "b", long_prompt(3))  # warm-up: the worker's first long prefill is slower
    first = probe(tenants, "a", secret)  # cold: prefilled and cached under a's group salt
    own = min(probe(tenants, "a", secret), probe(tenants, "a", secret))  # the faster of two hits
    exact = probe(tenants, "b", secret)  # the probe: b's exact guess of a's prompt
    guess = probe(tenants, "b", wrong)
    grouped = probe(tenants, "c", secret)  # c shares a's cache on purpose
    timings = {
        "a first": first,
        "a again": own,
        "b exact guess": exact,
        "b wrong guess": guess,
        "c (a's group)": grouped,
    }
    for name, (seconds, hits, tokens) in timings.items():
        print(
            f"{name:>15}: {seconds:6.3f} s, {hits:6.0f} of {tokens} prompt tokens from the prefix cache",
            file=sys.stderr,
        )
    tokens = first[2]
    assert tokens > 1200
    assert own[1] >= 0.8 * tokens and grouped[1] >= 0.8 * tokens  # a key (and its group) hit their cache
    assert exact[1] == 0 and guess[1] == 0  # nothing of a's reaches b
    # The timing channel is closed: b's exact guess costs a whole prefill, like a wrong one, while a
    # cached prompt answers in a fraction of it (generous bounds: the machine is shared).
    assert exact[0] > 0.5 * guess[0]
    assert own[0] < 0.5 * exact[0] and grouped[0] < 0.5 * exact[0]


def test_the_worker_answers_the_gateway_only(tenants: Stack) -> None:
    worker = tenants.worker_url(MODEL)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    assert httpx.post(f"{worker}/v1/completions", json=body, timeout=60).status_code == 401
    assert httpx.get(f"{worker}/v1/models", timeout=10).status_code == 401
    # What vLLM's --api-key leaves open: the probes the gateway (and a kubelet) need.
    assert httpx.get(f"{worker}/health", timeout=10).status_code == 200
    assert "vllm:" in httpx.get(f"{worker}/metrics", timeout=10).text
    keyed = httpx.post(
        f"{worker}/v1/completions", json=body, headers={"authorization": f"Bearer {WORKER_KEY}"}, timeout=60
    )
    assert keyed.status_code == 200


HI = [{"role": "user", "content": "Hi"}]
ROUTES = [("/chat", {"messages": HI}), ("/v1/chat/completions", {"messages": HI}),
          ("/v1/responses", {"input": "Hi", "max_output_tokens": 2})]  # fmt: skip
STREAMED_OR_NOT = [(path, body, stream) for path, body in ROUTES for stream in (False, True)]


@pytest.mark.parametrize(
    ("path", "body", "stream"),
    [*STREAMED_OR_NOT, ("/v1/chat/completions/batch", {"messages": [HI]}, False)],
)
def test_every_route_takes_its_salt_on_the_real_worker(
    tenants: Stack, path: str, body: dict[str, Any], stream: bool
) -> None:
    request = {"model": MODEL, "max_tokens": 2, "stream": stream, "cache_salt": "my-own", **body}
    if path == "/chat":
        request.pop("cache_salt")  # the native API has no such field
    if path == "/v1/responses":
        request.pop("max_tokens")
    answer = httpx.post(
        f"{tenants.url}{path}", json=request, headers={"authorization": f"Bearer {KEYS['a']}"}, timeout=300
    )
    assert answer.status_code == 200, answer.text
