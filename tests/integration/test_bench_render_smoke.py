"""The render benchmark runs end to end (briefly), comparing this checkout with itself: it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_render_benchmark_quick_run(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "bench.render", "--quick", "--before", str(ROOT)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "render-quick.json").read_text())
    assert set(report["render_us"]) == {"short", "40 turns", "tools"}
    for case in report["render_us"].values():
        assert case["before"] > 0 and case["after"] > 0
    for path in ("/chat", "/v1/chat/completions"):
        assert report["gateway_cpu_ms"][path]["after"] > 0
