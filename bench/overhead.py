"""Gateway overhead: the same requests to a fast stand-in upstream, directly and through the gateway,
alternating rounds in one run; the load generator runs in its own process.

    .venv/bin/python -m bench.overhead            # full run, writes bench/results/overhead.json
    .venv/bin/python -m bench.overhead --quick    # a few seconds (the smoke test uses this)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psutil

from bench.common import ROOT, console, loadgen, percentile, save, table, wait_http
from service.ops.settings import Settings
from service.workers.supervisor import free_port

PROMPT = "The quick brown fox jumps over the lazy dog"
SCENARIOS = [  # name, stream, concurrency, requests per round (full run)
    ("unstreamed c=1", False, 1, 2000),
    ("unstreamed c=32", False, 32, 6000),
    ("streamed 256 c=1", True, 1, 40),
    ("streamed 256 c=32", True, 32, 320),
]


def start_floor(direct: str) -> tuple[subprocess.Popen[bytes], str]:
    """The minimal proxy (bench/minimal_proxy.py): what any Python gateway on this stack costs."""
    port = free_port("127.0.0.1")
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.minimal_proxy", "--port", str(port), "--upstream", direct], cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health", 60, floor)
    return floor, base


def start_stack() -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str, str]:
    upstream_port, gateway_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.fast_upstream", "--port", str(upstream_port)], cwd=ROOT
    )
    tokenizer = Settings().resolve_source("builtin:smollm2-135m-instruct")
    models = [
        {"name": "m", "kind": "base", "tokenizer": tokenizer, "urls": [f"http://127.0.0.1:{upstream_port}"]}
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_PORT=str(gateway_port),
        GATEWAY_MODELS=json.dumps(models),
        GATEWAY_MAX_IN_FLIGHT_PER_WORKER="4096",
        GATEWAY_MAX_QUEUE_PER_MODEL="4096",
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct, through = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{gateway_port}"
    wait_http(f"{direct}/health", 60, upstream)
    wait_http(f"{through}/ready", 120, gateway)
    return upstream, gateway, direct, through


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (what /proc/<pid>/stat says)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def timed_loadgen(pid: int, url: str, body: dict[str, Any], concurrency: int, count: int) -> dict[str, Any]:
    """A load generator run, with the CPU seconds the measured process (`pid`) spent on it."""
    before = cpu_seconds(pid)
    result = loadgen(url, body, concurrency, count)
    result["cpu_s"] = cpu_seconds(pid) - before
    return result


def measure(rounds: int, scale: float, with_floor: bool, only: str | None = None) -> dict[str, Any]:
    upstream, gateway, direct, through = start_stack()
    processes = [gateway, upstream]
    # Each target, and the process whose CPU it costs (direct: the stand-in itself).
    targets = [("direct", direct, upstream.pid), ("gateway", through, gateway.pid)]
    if with_floor:
        floor, floor_base = start_floor(direct)
        processes.insert(0, floor)
        targets.append(("floor", floor_base, floor.pid))
    results: dict[str, Any] = {}
    try:
        for name, stream, concurrency, requests in SCENARIOS:
            if only is not None and name != only:
                continue
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 256 if stream else 1, "stream": stream}
            count = max(concurrency, int(requests * scale))
            loadgen(f"{through}/v1/completions", body, concurrency, max(concurrency, count // 10))  # warm up
            runs: dict[str, list[dict[str, Any]]] = {target: [] for target, _, _ in targets}
            for _ in range(rounds):
                for target, base, pid in targets:
                    runs[target].append(
                        timed_loadgen(pid, f"{base}/v1/completions", body, concurrency, count)
                    )
            results[name] = summarize(runs)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return results


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, measurements in runs.items():
        latencies = [x for m in measurements for x in m["latencies"]]
        gaps = [x for m in measurements for x in m["gaps"]]
        wall = sum(m["wall"] for m in measurements)
        out[target] = {
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "requests_per_s": len(latencies) / wall,
            "events_per_s": sum(m["events"] for m in measurements) / wall,
            "itl_p50_ms": percentile(gaps, 50) * 1e3 if gaps else None,
            "failures": sum(m["failures"] for m in measurements),
            "cpu_ms_per_request": sum(m["cpu_s"] for m in measurements) / len(latencies) * 1e3,
        }
    d, g = out["direct"], out["gateway"]
    out["added_p50_ms"] = g["p50_ms"] - d["p50_ms"]
    out["added_p99_ms"] = g["p99_ms"] - d["p99_ms"]
    out["requests_ratio"] = g["requests_per_s"] / d["requests_per_s"]
    out["events_ratio"] = g["events_per_s"] / d["events_per_s"] if d["events_per_s"] else None
    out["added_itl_p50_ms"] = g["itl_p50_ms"] - d["itl_p50_ms"] if d["itl_p50_ms"] is not None else None
    if "floor" in out:
        f = out["floor"]
        out["floor_added_p50_ms"] = f["p50_ms"] - d["p50_ms"]
        out["floor_requests_ratio"] = f["requests_per_s"] / d["requests_per_s"]
        out["floor_events_ratio"] = f["events_per_s"] / d["events_per_s"] if d["events_per_s"] else None
    return out


Column = tuple[str, Callable[[dict[str, Any]], Any]]
COLUMNS: list[Column] = [
    ("direct p50", lambda r: r["direct"]["p50_ms"]),
    ("gateway p50", lambda r: r["gateway"]["p50_ms"]),
    ("added p50", lambda r: r["added_p50_ms"]),
    ("added p99", lambda r: r["added_p99_ms"]),
    ("direct req/s", lambda r: r["direct"]["requests_per_s"]),
    ("gateway req/s", lambda r: r["gateway"]["requests_per_s"]),
    ("req ratio", lambda r: r["requests_ratio"]),
    ("events ratio", lambda r: r["events_ratio"]),
    ("added ITL p50", lambda r: r["added_itl_p50_ms"]),
    ("gateway CPU/req", lambda r: r["gateway"]["cpu_ms_per_request"]),
]
FLOOR_COLUMNS: list[Column] = [
    ("gateway added p50", lambda r: r["added_p50_ms"]),
    ("floor added p50", lambda r: r["floor_added_p50_ms"]),
    ("gateway req ratio", lambda r: r["requests_ratio"]),
    ("floor req ratio", lambda r: r["floor_requests_ratio"]),
    ("gateway events ratio", lambda r: r["events_ratio"]),
    ("floor events ratio", lambda r: r["floor_events_ratio"]),
    ("gateway CPU/req", lambda r: r["gateway"]["cpu_ms_per_request"]),
    ("floor CPU/req", lambda r: r["floor"]["cpu_ms_per_request"]),
]


def report(title: str, columns: list[Column], results: dict[str, Any]) -> None:
    """One table: a row per scenario, a column per (header, value) pair; missing values print as -."""
    rows = []
    for name, result in results.items():
        values = [value(result) for _, value in columns]
        rows.append([name, *("-" if value is None else value for value in values)])
    table(title, ["scenario", *(header for header, _ in columns)], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--floor", action="store_true", help="also measure bench/minimal_proxy.py")
    parser.add_argument("--only", choices=[name for name, *_ in SCENARIOS], help="run one scenario")
    args = parser.parse_args()
    rounds, scale = (1, 0.02) if args.quick else (args.rounds, 1.0)
    results = measure(rounds, scale, args.floor, args.only)
    report("Gateway overhead (ms; rates per second)", COLUMNS, results)
    if args.floor:
        title = "Gateway vs the minimal proxy (bench/minimal_proxy.py), both against direct"
        report(title, FLOOR_COLUMNS, results)
    name = "overhead" if not args.quick else "overhead-quick"
    path = save(name, {"rounds": rounds, "floor": args.floor, "results": results})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
