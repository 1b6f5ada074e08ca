"""What the kernel says about an embedded worker's processes (read from /proc, Linux): the CPU time
they have used, and whether any is stopped (SIGSTOP) or runnable. A worker starved of CPU still uses
some, or waits runnable for it; a stopped one does neither. Blocking file reads: call from a thread."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
STOPPED_STATES = frozenset("Tt")  # stopped by a signal, or by a debugger
MAX_PROCESSES = 256  # a worker's process tree is a handful (API server, engine core); bound the walk


@dataclass(frozen=True)
class TreeSample:
    """One look at a process and its descendants."""

    cpu_ticks: int  # user + system time of all of them, in clock ticks
    stopped: bool  # at least one is stopped
    runnable: bool  # at least one is running or waiting for a CPU


def sample_tree(pid: int, proc: Path = PROC) -> TreeSample | None:
    """The process `pid` and its descendants right now; None when `pid` is gone."""
    pending, seen = [pid], set[int]()
    ticks, stopped, runnable = 0, False, False
    while pending and len(seen) < MAX_PROCESSES:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        fields = _stat_fields(proc, current)
        if fields is None:
            if current == pid:
                return None
            continue  # a child that just exited
        state = fields[0]
        stopped = stopped or state in STOPPED_STATES
        runnable = runnable or state == "R"
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        pending += _children(proc, current)
    return TreeSample(ticks, stopped, runnable)


def _stat_fields(proc: Path, pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    fields = text[text.rfind(")") + 2 :].split()
    return fields if len(fields) > 12 else None


def _children(proc: Path, pid: int) -> list[int]:
    """Direct children of every thread of `pid`."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in (proc / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found
