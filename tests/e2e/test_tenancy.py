"""The cross-tenant probe against a real SmolLM2 worker: with API keys, key B's exact guess of key A's
long prompt finds nothing of A's in vLLM's prefix cache (as slow as a wrong guess), while A finds its
own and a key the operator grouped with A finds A's. The worker itself runs with its own API key
(`GATEWAY_WORKER_API_KEY`) and the workers' guard: the gateway's requests and probes pass, a direct
request without the key does not, on any route the worker serves but /health."""

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


def probe(stack: Stack, key: str, prompt: str, **fields: Any) -> tuple[float, float, int]:
    """Send `prompt` as `key`: (seconds to the answer, prefix-cache hit tokens on the worker, prompt
    tokens). One token is generated, so the time is the prefill's."""
    worker = stack.worker_url(MODEL)
    _, hits_before = prefix_cache(worker, WORKER_KEY)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, **fields}
    started = time.perf_counter()
    answer = httpx.post(
        f"{stack.url}/v1/completions",
        json=body,
        headers={"authorization": f"Bearer {KEYS[key]}"},
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    _, hits_after = prefix_cache(worker, WORKER_KEY)
    return elapsed, hits_after - hits_before, int(answer.json()["usage"]["prompt_tokens"])


def test_another_keys_exact_guess_is_as_slow_as_a_wrong_one(tenants: Stack) -> None:
    secret = long_prompt(1)
    probe(tenants, "b", long_prompt(2))  # warm-up: the worker's first long prefill is slower
    first = probe(tenants, "a", secret)  # cold: prefilled and cached under a's group salt
    exact = probe(tenants, "b", secret)  # the probe: b's exact guess of a's prompt
    runs: dict[str, list[tuple[float, float, int]]] = {
        "a again": [],
        "c (a's group)": [],
        "b wrong guess": [],
    }
    runs["b exact guess"] = [exact]
    for attempt in range(3):  # interleaved, so a busy moment of the shared machine hits all kinds alike
        runs["a again"].append(probe(tenants, "a", secret))
        runs["c (a's group)"].append(probe(tenants, "c", secret))  # c shares a's cache on purpose
        runs["b wrong guess"].append(probe(tenants, "b", long_prompt(10 + attempt)))
        if attempt:  # b's exact guess again, under a salt of b's own choosing: still nothing of a's
            runs["b exact guess"].append(probe(tenants, "b", secret, cache_salt=f"guess-{attempt}"))
    print(
        f"\n        a first: {first[0]:6.3f} s, {first[1]:6.0f} of {first[2]} tokens cached", file=sys.stderr
    )
    for name, measured in runs.items():
        seconds = ", ".join(f"{run[0]:.3f}" for run in measured)
        hits = ", ".join(f"{run[1]:.0f}" for run in measured)
        print(f"{name:>15}: {seconds} s; {hits} of {first[2]} tokens cached", file=sys.stderr)
    tokens = first[2]
    assert tokens > 1200 and first[1] == 0
    for name in ("a again", "c (a's group)"):  # a key, and the keys of its group, hit their cache
        assert all(run[1] >= 0.8 * tokens for run in runs[name]), runs[name]
    for name in ("b exact guess", "b wrong guess"):  # nothing of a's reaches b
        assert all(run[1] == 0 for run in runs[name]), runs[name]
    # The timing channel is closed: b's exact guess costs a whole prefill, like a wrong one, while a
    # cached prompt answers in a fraction of it. The fastest of each kind is compared: on a shared
    # machine, other work only ever adds time.
    fastest = {name: min(run[0] for run in measured) for name, measured in runs.items()}
    assert fastest["b exact guess"] > 0.5 * fastest["b wrong guess"]
    assert fastest["a again"] < 0.5 * fastest["b exact guess"]
    assert fastest["c (a's group)"] < 0.5 * fastest["b exact guess"]


def test_the_worker_answers_the_gateway_only(tenants: Stack) -> None:
    """vLLM's --api-key alone leaves /invocations (generation), /tokenize, /metrics and more open; with
    the workers' guard every route the worker publishes refuses a request without the key, /health
    apart, while the gateway still probes and serves through it."""
    worker = tenants.worker_url(MODEL)
    keyed = {"authorization": f"Bearer {WORKER_KEY}"}
    schema = httpx.get(f"{worker}/openapi.json", headers=keyed, timeout=30).json()
    routes = [(method.upper(), path.replace("{", "").replace("}", ""))
              for path, item in schema["paths"].items() for method in item]  # fmt: skip
    assert ("POST", "/invocations") in routes and ("GET", "/metrics") in routes
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no-such-route")]
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    with httpx.Client(base_url=worker, timeout=60) as http:
        for method, path in routes:
            for headers in ({}, {"authorization": "Bearer not-the-key"}):
                answer = http.request(method, path, json=body, headers=headers)
                if path == "/health":
                    assert answer.status_code == 200, (method, path)
                else:
                    assert answer.status_code == 401, (method, path, answer.status_code, answer.text[:200])
        for path in ("/invocations", "/v1/completions"):  # the key opens the door
            assert http.post(path, json=body, headers=keyed).status_code == 200
        assert "vllm:" in http.get("/metrics", headers=keyed).text
    # The gateway probes (ready) and serves through the guard.
    assert httpx.get(f"{tenants.url}/ready", timeout=10).status_code == 200
    served = httpx.post(f"{tenants.url}/v1/completions", json=body,
                        headers={"authorization": f"Bearer {KEYS['a']}"}, timeout=120)  # fmt: skip
    assert served.status_code == 200, served.text


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
