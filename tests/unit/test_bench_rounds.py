"""The benchmarks' shared round loop: every place once a round, rotated so none always runs first; the
paired ratio is the median of each round's pair."""

from __future__ import annotations

from typing import Any

import pytest

from bench import common
from bench.common import Place, alternating_rounds, paired_ratio, summarize_cpu


def test_rounds_rotate_so_no_place_always_runs_first(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    def fake_run(pid: int, url: str, *args: Any) -> dict[str, Any]:
        order.append(url)
        return {"latencies": [0.001], "failures": 0, "cpu_ms_per_request": float(pid)}

    monkeypatch.setattr(common, "cpu_loadgen", fake_run)
    places = [Place(name, pid, name, {}) for pid, name in enumerate("abc", start=1)]
    runs = alternating_rounds(places, 3, 1, 1)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(measured) for name, measured in runs.items()} == {"a": 3, "b": 3, "c": 3}
    order.clear()
    alternating_rounds(places, 2, 1, 1, rotate=False)
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_the_paired_ratio_is_the_median_of_each_rounds_pair() -> None:
    run = {"latencies": [0.001], "failures": 0}
    runs = {
        "this": [{**run, "cpu_ms_per_request": v} for v in (1.1, 2.0, 1.2)],
        "that": [{**run, "cpu_ms_per_request": v} for v in (1.0, 1.0, 1.0)],
    }
    summary = summarize_cpu(runs)
    assert summary["this"]["cpu_ms_per_request"] == 1.2
    assert paired_ratio(summary, "this", "that") == pytest.approx(1.2)
