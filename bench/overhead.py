"""Gateway overhead: the same requests to a fast stand-in upstream, directly and through the gateway,
alternating rounds in one run; the load generator runs in its own process.

    .venv/bin/python -m bench.overhead            # full run, writes bench/results/overhead.json
    .venv/bin/python -m bench.overhead --quick    # a few seconds (the smoke test uses this)
    .venv/bin/python -m bench.overhead --processes 2 --only "unstreamed c=32"
                                                  # also a gateway with 2 serving processes
    .venv/bin/python -m bench.overhead --tracing --only "unstreamed c=32"
                                                  # also a gateway exporting traces (to bench.otlp_sink)
    .venv/bin/python -m bench.overhead --adapter  # also the same gateway's model asked for as a LoRA
                                                  # adapter (served by the same stand-in), same rounds
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Place,
    alternating_rounds,
    console,
    gateway_env,
    loadgen,
    percentile,
    save,
    table,
    wait_http,
)
from bench.common import cpu_seconds as cpu_seconds  # where other benchmarks import it from
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


ADAPTER = "m-lora"  # the same model asked for as an adapter (the fast stand-in answers its loads with 200)


def adapter_folder() -> str:
    """A folder that passes the gateway's checks of a LoRA adapter (the stand-in reads no weights)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return str(folder)


def start_gateway(
    direct: str, processes: int, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway with `processes` serving processes in front of the stand-in; its model `m` also serves
    the adapter `m-lora`."""
    gateway_port = free_port("127.0.0.1")
    tokenizer = Settings().resolve_source("builtin:smollm2-135m-instruct")
    adapters = [{"name": ADAPTER, "path": adapter_folder()}]
    models = [{"name": "m", "kind": "base", "tokenizer": tokenizer, "urls": [direct], "adapters": adapters}]
    env = gateway_env()
    env.update(
        GATEWAY_PORT=str(gateway_port),
        GATEWAY_MODELS=json.dumps(models),
        GATEWAY_MAX_IN_FLIGHT_PER_WORKER="4096",
        GATEWAY_MAX_QUEUE_PER_MODEL="4096",
        GATEWAY_PROCESSES=str(processes),
        # A store of its own: the user's may be at another checkout's migration (start-up refused).
        GATEWAY_DATABASE_URL=f"sqlite:///{tempfile.mkdtemp(prefix='bench-store-')}/gateway.db",
        **(extra_env or {}),
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    through = f"http://127.0.0.1:{gateway_port}"
    wait_http(f"{through}/ready", 120, gateway)
    return gateway, through


def start_stack() -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str, str]:
    upstream_port = free_port("127.0.0.1")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.fast_upstream", "--port", str(upstream_port)], cwd=ROOT
    )
    direct = f"http://127.0.0.1:{upstream_port}"
    wait_http(f"{direct}/health", 60, upstream)
    gateway, through = start_gateway(direct, 1)
    return upstream, gateway, direct, through


def measure(
    rounds: int,
    scale: float,
    with_floor: bool,
    only: str | None = None,
    processes_n: int = 0,
    tracing: bool = False,
    adapter: bool = False,
) -> dict[str, Any]:
    upstream, gateway, direct, through = start_stack()
    processes = [gateway, upstream]
    # Each target, the process whose CPU it costs (direct: the stand-in itself), and the model it names.
    targets = [("direct", direct, upstream.pid, "m"), ("gateway", through, gateway.pid, "m")]
    if adapter:  # the same gateway, the same rounds: only the model asked for differs
        targets.append(("gateway adapter", through, gateway.pid, ADAPTER))
    if processes_n:
        many, many_base = start_gateway(direct, processes_n)
        processes.insert(0, many)
        targets.append((f"gateway x{processes_n}", many_base, many.pid, "m"))
    if tracing:
        sink_port = free_port("127.0.0.1")
        sink = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", "--port", str(sink_port)], cwd=ROOT)
        processes.append(sink)
        traced, traced_base = start_gateway(
            direct, 1, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"}
        )
        processes.insert(0, traced)
        targets.append(("gateway traced", traced_base, traced.pid, "m"))
    if with_floor:
        floor, floor_base = start_floor(direct)
        processes.insert(0, floor)
        targets.append(("floor", floor_base, floor.pid, "m"))
    results: dict[str, Any] = {}
    try:
        for name, stream, concurrency, requests in SCENARIOS:
            if only is not None and name != only:
                continue
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 256 if stream else 1, "stream": stream}
            count = max(concurrency, int(requests * scale))
            loadgen(f"{through}/v1/completions", body, concurrency, max(concurrency, count // 10))  # warm up
            if adapter:
                loadgen(f"{through}/v1/completions", {**body, "model": ADAPTER}, concurrency, concurrency)

            places = [
                Place(target, pid, f"{base}/v1/completions", {**body, "model": model})
                for target, base, pid, model in targets
            ]
            runs = alternating_rounds(places, rounds, concurrency, count, rotate=False)  # as it always ran
            results[name] = summarize(runs, processes_n)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return results


def versus(direct: dict[str, Any], other: dict[str, Any], prefix: str) -> dict[str, Any]:
    """What `other` adds to direct: latency added, requests and events per second as ratios."""
    return {
        f"{prefix}added_p50_ms": other["p50_ms"] - direct["p50_ms"],
        f"{prefix}added_p99_ms": other["p99_ms"] - direct["p99_ms"],
        f"{prefix}requests_ratio": other["requests_per_s"] / direct["requests_per_s"],
        f"{prefix}events_ratio": other["events_per_s"] / direct["events_per_s"]
        if direct["events_per_s"]
        else None,
    }


def summarize(runs: dict[str, list[dict[str, Any]]], processes_n: int = 0) -> dict[str, Any]:
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
    d = out["direct"]
    out.update(versus(d, out["gateway"], ""))
    out["added_itl_p50_ms"] = (
        out["gateway"]["itl_p50_ms"] - d["itl_p50_ms"] if d["itl_p50_ms"] is not None else None
    )
    # Each other gateway (and the floor) against direct, under its own prefix.
    for target, prefix in (
        (f"gateway x{processes_n}", "many_"),
        ("gateway traced", "traced_"),
        ("floor", "floor_"),
        ("gateway adapter", "adapter_"),
    ):
        if target in out:
            out.update(versus(d, out[target], prefix))
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


def process_columns(n: int) -> list[Column]:
    return [
        ("direct req/s", lambda r: r["direct"]["requests_per_s"]),
        ("1 process req/s", lambda r: r["gateway"]["requests_per_s"]),
        (f"{n} processes req/s", lambda r: r[f"gateway x{n}"]["requests_per_s"]),
        ("1 process added p50", lambda r: r["added_p50_ms"]),
        (f"{n} added p50", lambda r: r["many_added_p50_ms"]),
        ("1 process added p99", lambda r: r["added_p99_ms"]),
        (f"{n} added p99", lambda r: r["many_added_p99_ms"]),
        ("1 process CPU/req", lambda r: r["gateway"]["cpu_ms_per_request"]),
        (f"{n} CPU/req", lambda r: r[f"gateway x{n}"]["cpu_ms_per_request"]),
    ]


TRACING_COLUMNS: list[Column] = [
    ("off added p50", lambda r: r["added_p50_ms"]),
    ("on added p50", lambda r: r["traced_added_p50_ms"]),
    ("off added p99", lambda r: r["added_p99_ms"]),
    ("on added p99", lambda r: r["traced_added_p99_ms"]),
    ("off req ratio", lambda r: r["requests_ratio"]),
    ("on req ratio", lambda r: r["traced_requests_ratio"]),
    ("off CPU/req", lambda r: r["gateway"]["cpu_ms_per_request"]),
    ("on CPU/req", lambda r: r["gateway traced"]["cpu_ms_per_request"]),
]


ADAPTER_COLUMNS: list[Column] = [
    ("model added p50", lambda r: r["added_p50_ms"]),
    ("adapter added p50", lambda r: r["adapter_added_p50_ms"]),
    ("model added p99", lambda r: r["added_p99_ms"]),
    ("adapter added p99", lambda r: r["adapter_added_p99_ms"]),
    ("model req ratio", lambda r: r["requests_ratio"]),
    ("adapter req ratio", lambda r: r["adapter_requests_ratio"]),
    ("model CPU/req", lambda r: r["gateway"]["cpu_ms_per_request"]),
    ("adapter CPU/req", lambda r: r["gateway adapter"]["cpu_ms_per_request"]),
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
    parser.add_argument("--processes", type=int, default=0, help="also a gateway with N serving processes")
    parser.add_argument(
        "--tracing", action="store_true", help="also a gateway exporting every request's trace"
    )
    parser.add_argument("--adapter", action="store_true", help="also the model asked for as an adapter")
    args = parser.parse_args()
    rounds, scale = (1, 0.02) if args.quick else (args.rounds, 1.0)
    results = measure(rounds, scale, args.floor, args.only, args.processes, args.tracing, args.adapter)
    report("Gateway overhead (ms; rates per second)", COLUMNS, results)
    if args.adapter:
        report("A model vs the same model as an adapter, through one gateway (ms)", ADAPTER_COLUMNS, results)
    if args.tracing:
        report("Tracing off vs on (every request traced and exported; ms)", TRACING_COLUMNS, results)
    if args.processes:
        title = f"One gateway process vs {args.processes} (ms; rates per second; CPU of all its processes)"
        report(title, process_columns(args.processes), results)
    if args.floor:
        title = "Gateway vs the minimal proxy (bench/minimal_proxy.py), both against direct"
        report(title, FLOOR_COLUMNS, results)
    name = "overhead" if not args.quick else "overhead-quick"
    if args.processes:
        name += f"-processes{args.processes}"
    if args.tracing:
        name += "-tracing"
    if args.adapter:
        name += "-adapter"
    path = save(
        name,
        {
            "rounds": rounds,
            "floor": args.floor,
            "processes": args.processes,
            "adapter": args.adapter,
            "results": results,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
