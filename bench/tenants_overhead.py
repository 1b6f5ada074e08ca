"""CPU per request of three gateways of this tree, in the same run, rounds in rotating order, the same
requests to a fast stand-in: one without keys (no key check, no usage), one with a GATEWAY_API_KEYS key
(the key check, the cache salt, usage counted), and one with a key managed at runtime whose policy has
every limit (rate, requests in progress, token budget: each request reserves and settles) and usage.

    .venv/bin/python -m bench.tenants_overhead                 # writes bench/results/tenants-overhead.json
    .venv/bin/python -m bench.tenants_overhead --only "unstreamed c=32" --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    ROOT,
    Place,
    Runs,
    alternating_rounds,
    console,
    loadgen,
    paired_ratio,
    save,
    summarize_cpu,
    table,
    wait_http,
)
from bench.overhead import PROMPT, SCENARIOS
from service.ops.settings import Settings
from service.workers.supervisor import free_port

STATIC_KEY = "bench-static-key"
ADMIN_KEY = "bench-admin-key"
GATEWAYS = ("no keys", "static key", "runtime key, every limit")
# bench.overhead's streamed runs leave the gateway ~0.1 s of CPU, which /proc counts in 10 ms ticks: a run's
# CPU per request would be quantized to about 12 %, more than the difference measured. Here they get ~1 s.
REQUESTS = {"streamed 256 c=1": 400, "streamed 256 c=32": 1280}
POLICY = {"name": "bench", "rate_limit": "1000000000/minute", "max_concurrent": 4096,
          "token_budget": {"tokens": 10**15, "period": "day"}}  # fmt: skip


def start_gateway(direct: str, folder: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A one-process gateway of this tree before the stand-in, with a store of its own."""
    port = free_port("127.0.0.1")
    tokenizer = Settings().resolve_source("builtin:smollm2-135m-instruct")
    models = [{"name": "m", "kind": "base", "tokenizer": tokenizer, "urls": [direct]}]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_PORT=str(port), GATEWAY_MODELS=json.dumps(models), GATEWAY_PROCESSES="1",
        GATEWAY_MAX_IN_FLIGHT_PER_WORKER="4096", GATEWAY_MAX_QUEUE_PER_MODEL="4096",
        GATEWAY_DATABASE_URL=f"sqlite:///{folder / f'{port}.db'}", **extra,
    )  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/ready", 120, process)
    return process, base


def runtime_key(base: str) -> str:
    """A key with every limit, created through the operator API."""
    answer = httpx.post(f"{base}/keys", json=POLICY, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    answer.raise_for_status()
    return str(answer.json()["key"])


def measure(rounds: int, scale: float, only: str | None) -> dict[str, Any]:
    upstream_port = free_port("127.0.0.1")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.fast_upstream", "--port", str(upstream_port)], cwd=ROOT
    )
    direct = f"http://127.0.0.1:{upstream_port}"
    wait_http(f"{direct}/health", 60, upstream)
    processes = [upstream]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as scratch:
        try:
            targets = []
            for name, extra in zip(GATEWAYS, ({}, {"GATEWAY_API_KEYS": STATIC_KEY}, {"GATEWAY_ADMIN_KEYS": ADMIN_KEY}),
                                   strict=True):  # fmt: skip
                process, base = start_gateway(direct, Path(scratch), extra)
                processes.insert(0, process)
                key = (
                    None if name == GATEWAYS[0] else STATIC_KEY if name == GATEWAYS[1] else runtime_key(base)
                )
                targets.append((name, base, process.pid, key))
            for scenario, stream, concurrency, requests in SCENARIOS:
                if only is not None and scenario != only:
                    continue
                body = {"model": "m", "prompt": PROMPT, "max_tokens": 256 if stream else 1, "stream": stream}
                count = max(concurrency, int(REQUESTS.get(scenario, requests) * scale))
                for _name, base, _, key in targets:  # warm up every one
                    loadgen(f"{base}/v1/completions", body, concurrency, max(concurrency, count // 10), key)
                places = [
                    Place(name, pid, f"{base}/v1/completions", body, key) for name, base, pid, key in targets
                ]
                runs = alternating_rounds(places, rounds, concurrency, count)
                results[scenario] = summarize(runs)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    return results


def summarize(runs: Runs) -> dict[str, Any]:
    """Per gateway: CPU per request (median of rounds), latency, failures; the paired ratios."""
    out = summarize_cpu(runs)
    out["runtime_vs_none"] = paired_ratio(out, GATEWAYS[2], GATEWAYS[0])
    out["runtime_vs_static"] = paired_ratio(out, GATEWAYS[2], GATEWAYS[1])
    out["static_vs_none"] = paired_ratio(out, GATEWAYS[1], GATEWAYS[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--only", choices=[name for name, *_ in SCENARIOS], help="run one scenario")
    args = parser.parse_args()
    rounds, scale = (1, 0.05) if args.quick else (args.rounds, 1.0)
    results = measure(rounds, scale, args.only)
    rows = [
        [scenario, *(result[name]["cpu_ms_per_request"] for name in GATEWAYS), result["runtime_vs_none"],
         result["runtime_vs_static"], sum(result[name]["failures"] for name in GATEWAYS)]
        for scenario, result in results.items()
    ]  # fmt: skip
    headers = [
        "scenario",
        *(f"{name} CPU/req" for name in GATEWAYS),
        "runtime/none",
        "runtime/static",
        "failures",
    ]
    table(
        "Gateway CPU per request (ms): without keys, a static key, a runtime key with every limit",
        headers,
        rows,
    )
    path = save(
        "tenants-overhead" if not args.quick else "tenants-overhead-quick",
        {"rounds": rounds, "results": results},
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
