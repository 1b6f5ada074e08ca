"""The overhead benchmark runs end to end (briefly) and reports every scenario, and the cold-start
sampler follows a process tree until it is ready: they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import startup
from service.workers.supervisor import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_quick_run(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "bench.overhead", "--quick", "--floor", "--adapter"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "overhead-quick-adapter.json").read_text())
    assert report["machine"]["cpus"]
    results = report["results"]
    assert set(results) == {"unstreamed c=1", "unstreamed c=32", "streamed 256 c=1", "streamed 256 c=32"}
    for scenario in results.values():
        for target in ("direct", "gateway", "floor", "gateway adapter"):
            assert scenario[target]["failures"] == 0
            assert scenario[target]["requests_per_s"] > 0 and scenario[target]["p50_ms"] > 0
    assert results["streamed 256 c=1"]["gateway"]["events_per_s"] > 0
    assert results["streamed 256 c=1"]["floor"]["events_per_s"] > 0
    assert all("floor_added_p50_ms" in scenario for scenario in results.values())
    assert all("adapter_added_p50_ms" in scenario for scenario in results.values())


def test_cold_start_sampler_follows_the_process_tree_until_ready() -> None:
    port = free_port("127.0.0.1")
    # A shell (standing in for make) whose child is the server that becomes ready.
    server = f"{sys.executable} -m bench.fast_upstream --port {port}"
    make = subprocess.Popen(["sh", "-c", f"{server}; true"], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        cold = startup.measure(make, f"http://127.0.0.1:{port}/health", timeout=60)
    finally:
        make.terminate()
        subprocess.run(["pkill", "-f", f"fast_upstream --port {port}"], check=False)
        make.wait(timeout=30)
    assert 0 < cold.seconds < 60
    roles = {use.role: use for use in cold.processes.values()}
    python = next(use for role, use in roles.items() if role.startswith(sys.executable))
    assert python.cpu_s > 0.05  # the interpreter's start-up, at least
    assert startup.rows(cold, min_cpu_s=0.05)[0][0] == python.role


def test_overhead_benchmark_compares_processes_and_tracing(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "bench.overhead", "--quick", "--only", "unstreamed c=32"]
    run = subprocess.run([*command, "--processes", "2", "--tracing"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "overhead-quick-processes2-tracing.json").read_text())
    scenario = report["results"]["unstreamed c=32"]
    for target in ("gateway", "gateway x2", "gateway traced"):
        assert scenario[target]["failures"] == 0 and scenario[target]["requests_per_s"] > 0
        assert scenario[target]["cpu_ms_per_request"] > 0  # counted over every process of the gateway
    assert scenario["many_requests_ratio"] > 0 and scenario["traced_requests_ratio"] > 0


def test_large_answer_benchmark_runs(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "bench.large_answer", "--mb", "2", "--requests", "1"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "large_answer.json").read_text())
    assert 1.5 < report["answer_mb"] < 2.5 and report["health_polls"] > 0
    assert report["rss_peak_mib"] >= report["rss_before_mib"] > 0
