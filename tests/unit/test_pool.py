from __future__ import annotations

import pytest

from service.errors import NoHealthyWorker
from service.pool import ModelPool, Worker
from service.settings import ModelKind, ModelSpec

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")


def test_pick_prefers_the_least_busy_healthy_worker() -> None:
    busy = Worker("m", "http://a", healthy=True, outstanding=3)
    idle = Worker("m", "http://b", healthy=True, outstanding=1)
    down = Worker("m", "http://c", healthy=False, outstanding=0)
    assert ModelPool(SPEC, [busy, idle, down]).pick() is idle


def test_no_healthy_worker_is_a_503() -> None:
    with pytest.raises(NoHealthyWorker) as caught:
        ModelPool(SPEC, [Worker("m", "http://a")]).pick()
    assert caught.value.status_code == 503


def test_lease_counts_and_always_releases() -> None:
    worker = Worker("m", "http://a", healthy=True)
    pool = ModelPool(SPEC, [worker])
    with pytest.raises(RuntimeError), pool.lease():
        assert worker.outstanding == 1
        raise RuntimeError
    assert worker.outstanding == 0
