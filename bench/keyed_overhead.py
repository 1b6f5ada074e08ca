"""CPU per request of this tree's gateway against another checkout's (e.g. main), both with API keys
set, so the caller's cache salt (derived per key, spliced into the client's bytes) is on this tree's
hot path; the same requests to a fast stand-in, alternating rounds in one run.

    git worktree add /tmp/main-bench main
    .venv/bin/python -m bench.keyed_overhead --baseline /tmp/main-bench            # writes keyed-overhead.json
    .venv/bin/python -m bench.keyed_overhead --baseline /tmp/main-bench --only "unstreamed c=32" --rounds 6
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Place,
    Runs,
    alternating_rounds,
    console,
    gateway_env,
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

KEY = "bench-key"


def start_gateway(checkout: Path, direct: str) -> tuple[subprocess.Popen[bytes], str]:
    """A one-process gateway from `checkout` (its own code), with an API key, before the stand-in."""
    port = free_port("127.0.0.1")
    tokenizer = Settings().resolve_source("builtin:smollm2-135m-instruct")
    models = [{"name": "m", "kind": "base", "tokenizer": tokenizer, "urls": [direct]}]
    env = gateway_env()
    env.update(
        PYTHONPATH=str(checkout),
        GATEWAY_PORT=str(port),
        GATEWAY_MODELS=json.dumps(models),
        GATEWAY_API_KEYS=KEY,
        GATEWAY_MAX_IN_FLIGHT_PER_WORKER="4096",
        GATEWAY_MAX_QUEUE_PER_MODEL="4096",
        GATEWAY_PROCESSES="1",
    )
    command = [sys.executable, "-m", "service.cli", "serve"]
    process = subprocess.Popen(
        command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/ready", 120, process)
    return process, base


def measure(baseline: Path, rounds: int, scale: float, only: str | None) -> dict[str, Any]:
    upstream_port = free_port("127.0.0.1")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.fast_upstream", "--port", str(upstream_port)], cwd=ROOT
    )
    direct = f"http://127.0.0.1:{upstream_port}"
    wait_http(f"{direct}/health", 60, upstream)
    processes = [upstream]
    results: dict[str, Any] = {}
    try:
        targets = []
        for name, checkout in (("this tree", ROOT), ("baseline", baseline)):
            process, base = start_gateway(checkout, direct)
            processes.insert(0, process)
            targets.append((name, base, process.pid))
        for scenario, stream, concurrency, requests in SCENARIOS:
            if only is not None and scenario != only:
                continue
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 256 if stream else 1, "stream": stream}
            count = max(concurrency, int(requests * scale))
            for _name, base, _ in targets:  # warm up both
                loadgen(f"{base}/v1/completions", body, concurrency, max(concurrency, count // 10), KEY)

            # Rotating two gateways is ABBA: neither always runs first (or on a warmer machine).
            places = [Place(name, pid, f"{base}/v1/completions", body, KEY) for name, base, pid in targets]
            runs = alternating_rounds(places, rounds, concurrency, count)
            results[scenario] = summarize(runs)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return results


def summarize(runs: Runs) -> dict[str, Any]:
    """Per gateway: CPU per request (median of rounds, and each round), latency, failures; the ratio."""
    out = summarize_cpu(runs)
    out["cpu_ratio"] = paired_ratio(out, "this tree", "baseline")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", type=Path, required=True, help="another checkout (e.g. a worktree of main)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--only", choices=[name for name, *_ in SCENARIOS], help="run one scenario")
    args = parser.parse_args()
    rounds, scale = (1, 0.05) if args.quick else (args.rounds, 1.0)
    results = measure(args.baseline.resolve(), rounds, scale, args.only)
    rows = [
        [
            scenario,
            result["baseline"]["cpu_ms_per_request"],
            result["this tree"]["cpu_ms_per_request"],
            result["cpu_ratio"],
            result["baseline"]["p50_ms"],
            result["this tree"]["p50_ms"],
            result["baseline"]["failures"] + result["this tree"]["failures"],
        ]
        for scenario, result in results.items()
    ]
    headers = [
        "scenario",
        "baseline CPU/req",
        "this CPU/req",
        "ratio",
        "baseline p50",
        "this p50",
        "failures",
    ]
    table("Gateway CPU per request with API keys (ms), this tree vs the baseline", headers, rows)
    path = save(
        "keyed-overhead" if not args.quick else "keyed-overhead-quick", {"rounds": rounds, "results": results}
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
