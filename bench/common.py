"""Helpers shared by the benchmarks: processes, percentiles, tables, results files."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "bench" / "results"))
console = Console(width=200)
# The store of every gateway a benchmark starts: a throwaway one, never the user's (<cache>/gateway.db).
STORE = f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-store-')) / 'gateway.db'}"


def gateway_env(store: str = STORE) -> dict[str, str]:
    """The caller's environment without GATEWAY_* (a run sets what it measures) and with its own store, so a
    gateway started from another checkout never migrates the user's database nor fails on it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = store
    return env


def stop_all(gateways: Sequence[subprocess.Popen[bytes]], workers: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the gateways and the workers' process groups (a worker is a process tree), then wait."""
    for process in gateways:
        process.send_signal(signal.SIGTERM)
    for process in workers:
        os.killpg(process.pid, signal.SIGTERM)
    for process in [*gateways, *workers]:
        process.wait(timeout=60)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values, or NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_http(
    url: str,
    seconds: float = 600,
    process: subprocess.Popen[bytes] | None = None,
    while_waiting: Callable[[float], None] | None = None,
) -> float:
    """Wait for a 200 from url; returns how long it took. `while_waiting(elapsed)` runs at every poll."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}")
        if while_waiting is not None:
            while_waiting(time.monotonic() - started)
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def loadgen(
    url: str, body: dict[str, Any], concurrency: int, requests: int, bearer: str | None = None
) -> dict[str, Any]:
    """Run the load generator in its own process and return its measurements (read from a file)."""
    with tempfile.TemporaryDirectory(prefix="loadgen-") as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "bench.loadgen", "--url", url, "--body", json.dumps(body)]
        command += ["--concurrency", str(concurrency), "--requests", str(requests), "--output", str(report)]
        command += ["--bearer", bearer] if bearer else []
        run = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"load generator exited with {run.returncode}: {run.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(report.read_text())
    return result


Runs = dict[str, list[dict[str, Any]]]  # each place's measurements, one per round


@dataclass(frozen=True)
class Place:
    """One measured target: the process whose CPU counts, where the load goes, and what it sends."""

    name: str
    pid: int
    url: str
    body: dict[str, Any]
    bearer: str | None = None


def alternating_rounds(
    places: Sequence[Place], rounds: int, concurrency: int, requests: int, rotate: bool = True
) -> Runs:
    """The same load on every place once a round, with the CPU it cost; with `rotate`, each round starts
    one place further on, so none always runs first (or on a warmer machine: a shared one's load drifts)."""
    runs: Runs = {place.name: [] for place in places}
    for index in range(rounds):
        shift = index % len(places) if rotate else 0
        for place in [*places[shift:], *places[:shift]]:
            runs[place.name].append(
                cpu_loadgen(place.pid, place.url, place.body, concurrency, requests, place.bearer)
            )
    return runs


def summarize_cpu(runs: Runs) -> dict[str, Any]:
    """Per target: CPU per request (median of rounds, and each round's), latency, failures."""
    out: dict[str, Any] = {}
    for name, measured in runs.items():
        latencies = [x for run in measured for x in run["latencies"]]
        per_round = [run["cpu_ms_per_request"] for run in measured]
        out[name] = {
            "cpu_ms_per_request": statistics.median(per_round),
            "cpu_ms_per_request_rounds": per_round,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "failures": sum(run["failures"] for run in measured),
            "failure_statuses": [run.get("failure_statuses", {}) for run in measured],
            "first_errors": [run.get("first_errors", {}) for run in measured if run.get("first_errors")],
        }
    return out


def paired_ratio(summary: dict[str, Any], this: str, that: str) -> float:
    """The median over rounds of this target's CPU per request over that one's: each round's runs were
    close together, so their ratio is the least disturbed by the machine's other load."""
    pairs = zip(
        summary[this]["cpu_ms_per_request_rounds"], summary[that]["cpu_ms_per_request_rounds"], strict=True
    )
    return float(statistics.median(a / b for a, b in pairs))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far (what /proc/<pid>/stat says)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def cpu_loadgen(
    pid: int, url: str, body: dict[str, Any], concurrency: int, requests: int, bearer: str | None = None
) -> dict[str, Any]:
    """A load generator run, with the CPU milliseconds per request the measured process (`pid`) spent."""
    before = cpu_seconds(pid)
    run = loadgen(url, body, concurrency, requests, bearer)
    run["cpu_s"] = cpu_seconds(pid) - before
    run["cpu_ms_per_request"] = run["cpu_s"] / max(1, len(run["latencies"])) * 1e3
    return run


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    view = Table(title=title)
    for column in columns:
        view.add_column(column, justify="right")
    for row in rows:
        view.add_row(*[f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in row])
    console.print(view)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
