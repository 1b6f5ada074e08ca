from __future__ import annotations

import asyncio

import pytest

from service.errors import NoHealthyWorker, Overloaded
from service.ops.settings import ModelKind, ModelSpec
from service.workers.pool import Capacity, ModelPool, Worker
from service.workers.routing import RouteHint

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")


def test_pick_prefers_the_least_busy_healthy_worker() -> None:
    busy = Worker("m", "http://a", up=True, outstanding=3)
    idle = Worker("m", "http://b", up=True, outstanding=1)
    down = Worker("m", "http://c", up=False, outstanding=0)
    assert ModelPool(SPEC, [busy, idle, down]).pick() is idle


async def test_no_healthy_worker_is_a_503_at_once() -> None:
    with pytest.raises(NoHealthyWorker) as caught:
        await ModelPool(SPEC, [Worker("m", "http://a")]).acquire()
    assert caught.value.status_code == 503


async def test_full_workers_queue_first_come_first_served() -> None:
    worker = Worker("m", "http://a", up=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=1, queue=2, queue_timeout=5))
    first = await pool.acquire()
    waiting = [asyncio.ensure_future(pool.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.queued == 2 and worker.outstanding == 1
    with pytest.raises(Overloaded) as caught:
        await pool.acquire()  # the line is full
    assert caught.value.headers == {"Retry-After": "1"}
    pool.release(first)
    second = await waiting[0]
    assert second.worker is worker and not waiting[1].done()
    pool.release(second)
    third = await waiting[1]
    assert third.worker is worker
    pool.release(third)
    assert worker.outstanding == 0 and pool.queued == 0


async def test_queue_wait_times_out_without_leaking_a_slot() -> None:
    worker = Worker("m", "http://a", up=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=1, queue=4, queue_timeout=0.05))
    held = await pool.acquire()
    with pytest.raises(Overloaded, match=r"within 0\.05 s"):
        await pool.acquire()
    assert pool.queued == 0
    pool.release(held)
    assert worker.outstanding == 0


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    worker = Worker("m", "http://a", up=True)
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
    a = Worker("m", "http://a", up=True)
    b = Worker("m", "http://b", up=True, outstanding=5)
    pool = ModelPool(SPEC, [a, b])
    assert (await pool.acquire(exclude={a})).worker is b
    with pytest.raises(NoHealthyWorker):
        await ModelPool(SPEC, [a]).acquire(exclude={a})


async def test_a_queued_retry_is_never_handed_the_worker_it_excludes() -> None:
    """Failover that has to wait in line must still avoid the worker that just failed."""
    a = Worker("m", "http://a", up=True)
    b = Worker("m", "http://b", up=True)
    pool = ModelPool(SPEC, [a, b], Capacity(per_worker=1, queue=4, queue_timeout=5))
    on_a, on_b = await pool.acquire(), await pool.acquire()
    assert {on_a.worker, on_b.worker} == {a, b}
    if on_a.worker is b:
        on_a, on_b = on_b, on_a
    retry = asyncio.ensure_future(pool.acquire(exclude={a}))  # a failed: the retry must go to b
    await asyncio.sleep(0)
    pool.release(on_a)  # a frees up first
    await asyncio.sleep(0)
    assert not retry.done() and a.outstanding == 0
    pool.release(on_b)
    assert (await retry).worker is b


async def test_a_batch_is_charged_per_sequence() -> None:
    worker = Worker("m", "http://a", up=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=8, queue=4, queue_timeout=5))
    batch = await pool.acquire(sequences=6)
    assert worker.outstanding == 6
    small = asyncio.ensure_future(pool.acquire(sequences=3))  # 6 + 3 > 8: waits
    await asyncio.sleep(0)
    assert not small.done() and pool.queued == 1
    pool.release(batch)
    assert (await small).cost == 3 and worker.outstanding == 3


async def test_a_batch_bigger_than_a_worker_waits_for_a_whole_worker_and_is_not_overtaken() -> None:
    worker = Worker("m", "http://a", up=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=4, queue=4, queue_timeout=5))
    held = await pool.acquire()
    huge = asyncio.ensure_future(pool.acquire(sequences=1024 * 8))  # costs the whole worker
    await asyncio.sleep(0)
    small = asyncio.ensure_future(pool.acquire())  # would fit now, but waits behind the big one
    await asyncio.sleep(0)
    assert not huge.done() and not small.done()
    pool.release(held)
    whole = await huge
    assert whole.cost == 4 and worker.outstanding == 4 and not small.done()
    pool.release(whole)
    pool.release(await small)
    assert worker.outstanding == 0


async def test_keys_take_turns_in_the_line_and_one_key_holds_at_most_its_share() -> None:
    """One key filling the line delays only itself: another key's request goes at the next free slot,
    and one key cannot take every place in the line (review r2 F2)."""
    worker = Worker("m", "http://a", up=True)
    pool = ModelPool(SPEC, [worker], Capacity(per_worker=1, queue=8, queue_timeout=5, queue_share=0.5))
    a, b = RouteHint(caller="a"), RouteHint(caller="b")
    held = await pool.acquire(hint=a)
    hogs = [asyncio.ensure_future(pool.acquire(hint=a)) for _ in range(4)]  # a's share: 4 of 8 places
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="share of the queue"):
        await pool.acquire(hint=a)
    late = asyncio.ensure_future(pool.acquire(hint=b))  # b comes after all of a's
    await asyncio.sleep(0)
    pool.release(held)
    first = await hogs[0]  # a's turn first: it was waiting first
    pool.release(first)
    second = await late
    assert second.worker is worker  # then b's, ahead of a's other three
    assert not any(hog.done() for hog in hogs[1:])
    pool.release(second)
    for hog in hogs[1:]:
        pool.release(await hog)
    assert worker.outstanding == 0 and pool.queued == 0
