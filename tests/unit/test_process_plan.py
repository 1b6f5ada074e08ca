"""How many gateway processes serve, and how the gateway-wide limits are split between them."""

from __future__ import annotations

import pytest

import service.api.processes as processes
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


def test_gateway_wide_limits_are_split_between_the_processes() -> None:
    settings = Settings(
        models=[EXTERNAL], max_in_flight_per_worker=32, max_queue_per_model=5, max_connections=4096,
        rate_limit="600/minute",
    )  # fmt: skip
    assert processes.shares(settings, 3) == {
        "GATEWAY_MAX_IN_FLIGHT_PER_WORKER": "11",
        "GATEWAY_MAX_QUEUE_PER_MODEL": "2",
        "GATEWAY_MAX_CONNECTIONS": "1366",
        "GATEWAY_RATE_LIMIT": "200/1 minute",
    }
    Settings(models=[EXTERNAL], rate_limit=processes.shares(settings, 3)["GATEWAY_RATE_LIMIT"])  # valid
