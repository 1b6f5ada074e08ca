"""Admission when several processes share a worker: two pools of the same model on one counters
file, as two serving processes would be."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.errors import Overloaded
from service.ops.host_counters import HostCounters, Layout
from service.ops.settings import ModelKind, ModelSpec
from service.workers.pool import Capacity, ModelPool, Worker

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")


def two_processes(tmp_path: Path, queue: int = 4, timeout: float = 2.0) -> tuple[ModelPool, ModelPool]:
    """The pool of model `m` in two serving processes, one worker `w` with one slot."""
    path = tmp_path / "counters"
    HostCounters.create(path, Layout(2, 64, 16, 64))
    capacity = Capacity(per_worker=1, queue=queue, queue_timeout=timeout)
    here, there = (
        ModelPool(SPEC, [Worker("m", "http://w", name="w", up=True)], capacity, slots=counters)
        for counters in (HostCounters.attach(path, 0), HostCounters.attach(path, 1))
    )
    return here, there


async def test_a_slot_taken_in_one_process_is_taken_for_both(tmp_path: Path) -> None:
    here, there = two_processes(tmp_path, timeout=0.2)
    lease = await here.acquire()
    with pytest.raises(Overloaded, match="no worker slot freed"):
        await there.acquire()
    here.release(lease)
    there.release(await there.acquire())


async def test_a_waiter_learns_of_a_slot_another_process_frees(tmp_path: Path) -> None:
    here, there = two_processes(tmp_path)
    lease = await here.acquire()
    waiting = asyncio.ensure_future(there.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    here.release(lease)  # nothing in `there` hears of it: it must look
    freed = await asyncio.wait_for(waiting, 0.5)
    there.release(freed)


async def test_the_queue_bound_counts_every_process_s_waiters(tmp_path: Path) -> None:
    here, there = two_processes(tmp_path, queue=1)
    lease = await here.acquire()
    waiting = asyncio.ensure_future(there.acquire())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="queue is full"):
        await here.acquire()  # its own line is empty, the model's is not
    here.release(lease)
    there.release(await waiting)


async def test_a_new_arrival_does_not_take_a_freed_slot_while_another_process_has_waiters(
    tmp_path: Path,
) -> None:
    here, there = two_processes(tmp_path)
    lease = await there.acquire()
    waiting_here = asyncio.ensure_future(here.acquire())
    await asyncio.sleep(0)
    there.release(lease)  # free, and `here` has not looked yet
    arrival = asyncio.ensure_future(there.acquire())
    await asyncio.sleep(0)
    assert not arrival.done() and there.queued == 1  # it joined its own line instead
    first = await asyncio.wait_for(asyncio.wait({waiting_here, arrival}, return_when="FIRST_COMPLETED"), 1)
    (done,), _ = first
    (here if done is waiting_here else there).release(done.result())
    for pool, task in ((here, waiting_here), (there, arrival)):
        if task is not done:
            pool.release(await task)
