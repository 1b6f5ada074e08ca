from __future__ import annotations

import asyncio

import pytest

from service.errors import NoHealthyWorker, Overloaded
from service.pool import Capacity, ModelPool, Worker
from service.settings import ModelKind, ModelSpec

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")


def test_pick_prefers_the_least_busy_healthy_worker() -> None:
    busy = Worker("m", "http://a", healthy=True, outstanding=3)
    idle = Worker("m", "http://b", healthy=True, outstanding=1)
    down = Worker("m", "http://c", healthy=False, outstanding=0)
    assert ModelPool(SPEC, [busy, idle, down]).pick() is idle


async def test_no_healthy_worker_is_a_503_at_once() -> None:
    with pytest.raises(NoHealthyWorker) as caught:
        await ModelPool(SPEC, [Worker("m", "http://a")]).acquire()
    assert caught.value.status_code == 503


async def test_full_workers_queue_first_come_first_served() -> None:
    worker = Worker("m", "http://a", healthy=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=1, queue=2, queue_timeout=5))
    first = await pool.acquire()
    waiting = [asyncio.ensure_future(pool.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.queued == 2 and worker.outstanding == 1
    with pytest.raises(Overloaded) as caught:
        await pool.acquire()  # the line is full
    assert caught.value.headers == {"Retry-After": "1"}
    pool.release(first)
    assert await waiting[0] is worker and not waiting[1].done()
    pool.release(worker)
    assert await waiting[1] is worker
    pool.release(worker)
    assert worker.outstanding == 0 and pool.queued == 0


async def test_queue_wait_times_out_without_leaking_a_slot() -> None:
    worker = Worker("m", "http://a", healthy=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=1, queue=4, queue_timeout=0.05))
    held = await pool.acquire()
    with pytest.raises(Overloaded, match=r"within 0\.05 s"):
        await pool.acquire()
    assert pool.queued == 0
    pool.release(held)
    assert worker.outstanding == 0


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    worker = Worker("m", "http://a", healthy=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=1, queue=4, queue_timeout=5))
    held = await pool.acquire()
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert pool.queued == 0
    pool.release(held)
    assert worker.outstanding == 0


async def test_exclude_skips_the_worker_that_just_failed() -> None:
    a = Worker("m", "http://a", healthy=True)
    b = Worker("m", "http://b", healthy=True, outstanding=5)
    pool = ModelPool(SPEC, [a, b])
    assert await pool.acquire(exclude=a) is b
    with pytest.raises(NoHealthyWorker):
        await ModelPool(SPEC, [a]).acquire(exclude=a)
