"""The overhead benchmark runs end to end (briefly) and reports every scenario: it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_quick_run(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "bench.overhead", "--quick", "--floor"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "overhead-quick.json").read_text())
    assert report["machine"]["cpus"]
    results = report["results"]
    assert set(results) == {"unstreamed c=1", "unstreamed c=32", "streamed 256 c=1", "streamed 256 c=32"}
    for scenario in results.values():
        for target in ("direct", "gateway", "floor"):
            assert scenario[target]["failures"] == 0
            assert scenario[target]["requests_per_s"] > 0 and scenario[target]["p50_ms"] > 0
    assert results["streamed 256 c=1"]["gateway"]["events_per_s"] > 0
    assert results["streamed 256 c=1"]["floor"]["events_per_s"] > 0
    assert all("floor_added_p50_ms" in scenario for scenario in results.values())
