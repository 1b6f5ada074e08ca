"""What the kernel says about a worker's processes, and the roster that tells other gateway processes
where (and which) they are."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ops.settings import ModelKind, ModelSpec
from service.workers.pool import ModelPool
from service.workers.proc_stat import sample_tree
from service.workers.roster import follow, read_roster, roster_of, write_roster
from service.workers.worker import Worker

# A parent that idles while its child spins: the tree's CPU time moves through the child alone.
PARENT = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'while True: pass']); "
    "print(child.pid, flush=True); time.sleep(60)"
)


@contextlib.contextmanager
def process_tree() -> Iterator[tuple[int, int]]:
    """(parent pid, child pid) of a real process tree: an idle parent and its spinning child."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        yield parent.pid, child
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdout.close()


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    with process_tree() as pids:
        yield pids


def test_a_tree_counts_its_childrens_cpu_time_and_state(tree: tuple[int, int]) -> None:
    parent, child = tree
    first = sample_tree(parent)
    time.sleep(0.3)
    second = sample_tree(parent)
    assert first is not None and second is not None
    assert second.cpu_ticks > first.cpu_ticks and second.runnable and not second.stopped
    os.kill(child, signal.SIGSTOP)
    time.sleep(0.1)
    stopped = sample_tree(parent)
    assert stopped is not None and stopped.stopped


def test_a_process_that_is_gone_has_no_sample() -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert sample_tree(finished.pid) is None


def test_the_roster_carries_each_workers_process_and_a_move_is_followed(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")
    published = ModelPool(spec, [Worker("m", "http://127.0.0.1:1", name="m-0", pid=41)])
    write_roster(tmp_path / "roster.json", roster_of([published]))
    follower = ModelPool(spec)
    roster = read_roster(tmp_path / "roster.json")
    assert roster is not None
    follow(follower, roster["m"])
    worker = follower.workers[0]
    assert (worker.url, worker.pid) == ("http://127.0.0.1:1", 41)
    worker.mark(True)
    worker.max_model_len = 2048
    worker.facts_read["read_model_entry"] = time.monotonic()
    follow(follower, [{"name": "m-0", "url": "http://127.0.0.1:2", "pid": 42}])  # restarted elsewhere
    assert follower.workers == [worker] and (worker.url, worker.pid) == ("http://127.0.0.1:2", 42)
    assert not worker.healthy and not worker.facts_read  # down until checked; its facts read again
    assert worker.max_model_len == 2048  # what it said stays until then
    follow(follower, [{"name": "m-0", "url": "http://127.0.0.1:2"}])  # its process exited
    assert worker.pid is None
