"""What the gateway's limits count on, as two small interfaces any store can implement.

- `Windows`: hits per key within a moving window of time (each API key's request rate, failed key
  attempts per client address; later, per-tenant token budgets).
- `Holdings`: units a key holds right now and gives back when done (a worker's in-flight slots, a
  model's queue places), bounded by a cap checked and taken in one step.

`service.ops.host_counters` implements both in memory (one process) or in a memory-mapped file (the
serving processes of one host). A store for several hosts (a database, Redis) implements the same
two protocols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

BUCKETS = 60  # a window is counted in this many buckets, so it moves in steps of 1/60 of its length


@dataclass(frozen=True)
class Window:
    """At most `limit` units in any `seconds`-long stretch of time."""

    limit: int
    seconds: float

    @property
    def bucket_seconds(self) -> float:
        """The granularity the window moves by."""
        return self.seconds / BUCKETS


@dataclass(frozen=True)
class Verdict:
    """Whether a hit fits its window, and if not, in how many seconds it would (inf: never)."""

    allowed: bool
    retry_after: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` in whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(min(self.retry_after, 86_400.0))))


class Windows(Protocol):
    """Hits per key within one moving window (the same for every key of this counter)."""

    window: Window

    def hit(self, key: str, cost: int = 1) -> Verdict:
        """Count `cost` for `key` if it fits the window; the verdict either way."""
        ...

    def check(self, key: str, cost: int = 1) -> Verdict:
        """Whether `cost` more would fit now, counting nothing."""
        ...


class Holdings(Protocol):
    """Units held per key, taken against a cap and given back."""

    @property
    def shared(self) -> bool:
        """True when other processes take and give too (a waiter must look again now and then)."""
        ...

    def take(self, key: str, cost: int, cap: int) -> bool:
        """Hold `cost` more units of `key` if all holders together stay within `cap`."""
        ...

    def give(self, key: str, cost: int) -> None:
        """Give back units this process took."""
        ...

    def held(self, key: str) -> int:
        """Units of `key` held by every holder together."""
        ...


def window_count(ring: list[int]) -> int:
    """Units in a window's buckets (the oldest bucket counted whole: never more than the limit)."""
    return sum(ring)


def advance(ring: list[int], last: int, bucket: int) -> None:
    """Empty the buckets that fell out of the window between bucket index `last` and `bucket`."""
    size = len(ring)
    if bucket - last >= size:
        ring[:] = [0] * size
        return
    for index in range(last + 1, bucket + 1):
        ring[index % size] = 0


def verdict(ring: list[int], bucket: int, window: Window, cost: int, now: float) -> Verdict:
    """Whether `cost` fits the window whose newest bucket is `bucket`; if not, when it would: the
    time the oldest buckets holding enough units stop being counted."""
    total = window_count(ring)
    excess = total + cost - window.limit
    if excess <= 0:
        return Verdict(True)
    if cost > window.limit:
        return Verdict(False, math.inf)
    size = len(ring)  # BUCKETS + 1: the window's buckets plus the one it is partly past
    freed = 0
    for oldest in range(bucket - size + 1, bucket + 1):
        freed += ring[oldest % size]
        if freed >= excess:
            return Verdict(False, (oldest + size) * window.bucket_seconds - now)
    return Verdict(False, window.seconds)  # unreachable while the ring holds the total
