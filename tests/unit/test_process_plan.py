"""How many gateway processes serve, and what each is told: the limits as set, where shared state is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import service.api.processes as processes
from service.ops.host_counters import HostCounters
from service.ops.settings import ModelKind, ModelSpec, Settings

EXTERNAL = ModelSpec(name="m", kind=ModelKind.BASE, tokenizer="/t", urls=["http://w:1"])
EMBEDDED = ModelSpec(name="e", kind=ModelKind.BASE, source="/m", replicas=2)


@pytest.mark.parametrize(
    ("cores", "models", "setting", "expected"),
    [
        (2, [EXTERNAL], 0, 2),  # external workers only: a process per core
        (2, [EMBEDDED], 0, 1),  # two embedded workers take both cores: one process, never zero
        (16, [EMBEDDED], 0, 8),  # capped
        (16, [EXTERNAL], 3, 3),  # set by hand
    ],
)
def test_the_default_is_a_process_per_free_core(
    monkeypatch: pytest.MonkeyPatch, cores: int, models: list[ModelSpec], setting: int, expected: int
) -> None:
    monkeypatch.setattr(processes, "available_cores", lambda: cores)
    assert processes.process_count(Settings(models=models, processes=setting)) == expected


def test_every_serving_process_gets_the_limits_as_set_and_its_own_counters_column(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    limits = {"GATEWAY_MAX_IN_FLIGHT_PER_WORKER": "32", "GATEWAY_MAX_QUEUE_PER_MODEL": "5",
              "GATEWAY_MAX_CONNECTIONS": "4096", "GATEWAY_RATE_LIMIT": "600/minute"}  # fmt: skip
    for name, value in limits.items():
        monkeypatch.setenv(name, value)
    settings = Settings(models=[EXTERNAL], port=0)
    with processes.listening_socket(settings) as sock:
        supervisor = processes.Supervisor(settings, 3, sock, tmp_path)
        envs = [supervisor.child_env(index) for index in range(3)]
    placement = {"GATEWAY_PROCESSES", "GATEWAY_ROSTER_FILE", "GATEWAY_SHARED_COUNTERS_FILE",
                 "GATEWAY_SHARED_COUNTERS_COLUMN", "GATEWAY_HOST", "GATEWAY_PORT"}  # fmt: skip
    for index, env in enumerate(envs):
        changed = {k for k, v in env.items() if k.startswith("GATEWAY_") and os.environ.get(k) != v}
        assert changed <= placement  # no limit is divided: each holds host-wide, as set
        assert env["GATEWAY_SHARED_COUNTERS_COLUMN"] == str(index)
        HostCounters.attach(Path(env["GATEWAY_SHARED_COUNTERS_FILE"]), index).close()


def test_the_supervisor_empties_an_operator_given_metrics_folder(tmp_path: Path) -> None:
    (tmp_path / "counter_1234.db").write_bytes(b"stale")
    (tmp_path / "gauge_livesum_99.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("not ours")
    processes.clear_metrics_dir(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
