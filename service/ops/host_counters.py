"""`Windows` and `Holdings` (see `service.ops.counters`) for the gateway processes of one host.

The counters live in a memory-mapped file the supervising process creates in its private folder
(with one process: anonymous memory, same code). Each of its tables is an open-addressing hash table
of fixed-size rows, a row per key (16 bytes of its BLAKE2 digest, then int64 words):

- holdings: one word per serving process (its *column*): a process only ever changes its own, a
  total is their sum, and when the supervisor replaces a dead process it zeroes that column, so
  slots and queue places the dead process held come back;
- windows (per API key, per client address): the bucket index of the last hit, when the row stops
  counting anything, then BUCKETS + 1 bucket counts.

Exclusion between processes is a POSIX byte-range lock (`fcntl.lockf`) per row, and one per table
for finding or claiming a row: the kernel drops a dead process's locks, so a process killed inside a
lock cannot wedge the others. A row that counts nothing any more (no units held, window passed) may
be claimed by another key; each operation checks under the row's lock that the row is still its key's.
Probing is bounded: a key that finds no row within PROBES places is not counted (`take` and `hit`
then allow, as a limit without a store would).

A table's header counts the rows ever claimed in it (bumped under the table's lock). A key only ever
gets a row by a claim, so a process that found no row for a key needs not look again while that count
has not moved: nearly every request's check of its address's failed keys costs one read of it. A claim
in any process moves it before the new row counts anything, so the memo never hides a count.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.ops.counters import BUCKETS, Verdict, Window, advance, verdict
from service.ops.settings import Settings

MAGIC = b"LGWCTR01"
KEY_BYTES = 16
EMPTY = bytes(KEY_BYTES)
PROBES = 32
HEADER_BYTES = 4096
TABLE_HEADER = 8  # a table's lock byte, and its claims count (an int64 there); rows start after it
CLAIMS = struct.Struct("<q")
FITS = Verdict(True)
WINDOW_WORDS = 2 + BUCKETS + 1  # last bucket, expiry (ns), ring
LAYOUT = struct.Struct("<8s7q")  # magic, columns, then rows of the three tables
HOLDING_ROWS = 1024  # workers (slots) and models (queue places): a few per model
ADDRESS_ROWS = 8192  # client addresses with failed key attempts in their window
RUNTIME_KEY_ROWS = (
    4096  # keys created at runtime under GATEWAY_RATE_LIMIT (a sparse file: unused rows cost nothing)
)


@dataclass(frozen=True)
class Layout:
    """Where each table is: the same for every process (read from the file's header)."""

    columns: int  # serving processes
    holding_rows: int
    key_rows: int
    address_rows: int

    def tables(self) -> tuple[tuple[int, int, int], ...]:
        """(offset, rows, words per row) of the holdings, API-key and address tables."""
        specs = ((self.holding_rows, self.columns), (self.key_rows, WINDOW_WORDS),
                 (self.address_rows, WINDOW_WORDS))  # fmt: skip
        offset, placed = HEADER_BYTES, []
        for rows, words in specs:
            placed.append((offset, rows, words))
            offset += TABLE_HEADER + rows * (KEY_BYTES + 8 * words)
        return tuple(placed)

    @property
    def size(self) -> int:
        offset, rows, words = self.tables()[-1]
        return offset + TABLE_HEADER + rows * (KEY_BYTES + 8 * words)


class _Locks:
    """Byte-range locks on the counters file, excluding other processes (none for anonymous memory)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def lock(self, offset: int) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)

    def unlock(self, offset: int) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)


Weight = Callable[[list[int]], int]  # how much a row holds: the lightest is evicted first


class _Table:
    """Rows of `words` int64 each, found by key digest."""

    def __init__(self, memory: mmap.mmap, offset: int, rows: int, words: int, locks: _Locks) -> None:
        self.memory, self.offset, self.rows, self.words, self.locks = memory, offset, rows, words, locks
        self.row_bytes = KEY_BYTES + 8 * words
        self.codec = struct.Struct(f"<{words}q")
        self.cache: dict[str, tuple[bytes, int]] = {}  # key -> digest, row; checked under the row's lock
        self.absent: dict[str, int] = {}  # key -> the claims count when it had no row

    def at(self, row: int) -> int:
        """Where a row starts in the memory."""
        return self.offset + TABLE_HEADER + row * self.row_bytes

    def read(self, row: int) -> list[int]:
        return list(self.codec.unpack_from(self.memory, self.at(row) + KEY_BYTES))

    def write(self, row: int, values: list[int]) -> None:
        self.codec.pack_into(self.memory, self.at(row) + KEY_BYTES, *values)

    def key_at(self, row: int) -> bytes:
        start = self.at(row)
        return self.memory[start : start + KEY_BYTES]

    def unlock(self, row: int) -> None:
        """Release a row `locate` returned."""
        self.locks.unlock(self.at(row))

    def claims(self) -> int:
        """Rows claimed in this table so far, by every process (read without the lock: a claim under
        way has not counted anything in its row yet)."""
        count: int = CLAIMS.unpack_from(self.memory, self.offset)[0]
        return count

    def rowless(self, key: str) -> bool:
        """Whether `key` surely has no row: it had none, and no key got one since (in any process)."""
        return self.absent.get(key, -1) == self.claims()

    def locate(
        self, key: str, idle: Callable[[list[int]], bool], claim: bool, weight: Weight | None = None
    ) -> int | None:
        """The row of `key` (claimed if it has none and `claim`), locked: `unlock` it when done. None:
        it has no row (and none could be claimed). With `weight`, a key that finds no free row takes
        the lightest row it probed (a full table never leaves a key uncounted)."""
        seen = -1 if claim else self.claims()
        if seen >= 0 and self.absent.get(key) == seen:
            return None  # `rowless`, with the count read once for the memo below
        cached = self.cache.get(key)
        digest = cached[0] if cached else hashlib.blake2b(key.encode(), digest_size=KEY_BYTES).digest()
        row = cached[1] if cached else None
        for _ in range(3):  # a cached row can be claimed by another key in between: look again
            if row is None:
                row = self._find(digest, idle, claim, weight)
                if row is None:
                    self._remember_absent(key, seen)
                    return None
            self.locks.lock(self.at(row))
            if self.key_at(row) == digest:
                if len(self.cache) >= self.rows:
                    self.cache.clear()  # addresses come and go: keep the memo bounded
                self.cache[key] = (digest, row)
                return row
            self.unlock(row)
            self.cache.pop(key, None)
            row = None
        return None

    def _remember_absent(self, key: str, seen: int) -> None:
        """`key` had no row when the claims count was `seen` (read before looking: a claim since
        then only makes the memo miss, never lie)."""
        if seen < 0:
            return
        if len(self.absent) >= self.rows:
            self.absent.clear()  # addresses come and go: keep the memo bounded
        self.absent[key] = seen

    def _find(
        self, digest: bytes, idle: Callable[[list[int]], bool], claim: bool, weight: Weight | None = None
    ) -> int | None:
        """Under the table's lock: the row holding `digest`, else (if `claim`) one claimed for it: a free
        or idle one, else with `weight` the lightest one probed (evicted)."""
        self.locks.lock(self.offset)
        try:
            start = int.from_bytes(digest[:8], "little") % self.rows
            free = None
            lightest: tuple[int, int] | None = None  # (weight, row)
            for probe in range(min(PROBES, self.rows)):
                row = (start + probe) % self.rows
                held = self.key_at(row)
                if held == digest:
                    return row
                if held == EMPTY:  # never used: the key is not further on
                    free = row if free is None else free
                    break
                words = self.read(row)
                if free is None and idle(words):
                    free = row
                if weight is not None and (lightest is None or weight(words) < lightest[0]):
                    lightest = (weight(words), row)
            if not claim:
                return None
            if free is None and lightest is not None:
                return lightest[1] if self._claim(lightest[1], digest, idle, evict=True) else None
            return free if free is not None and self._claim(free, digest, idle) else None
        finally:
            self.locks.unlock(self.offset)

    def _claim(self, row: int, digest: bytes, idle: Callable[[list[int]], bool], evict: bool = False) -> bool:
        """Give an unused or idle row (with `evict`, any row) to `digest` (under the table's lock)."""
        self.locks.lock(self.at(row))
        try:
            if not evict and self.key_at(row) != EMPTY and not idle(self.read(row)):
                return False  # used meanwhile by a process that holds its row from its memo
            # Counted before the row is the key's: a process that reads the old count may take the key
            # for rowless, which it still is (its row counts nothing until after this returns).
            CLAIMS.pack_into(self.memory, self.offset, self.claims() + 1)
            self.write(row, [0] * self.words)
            start = self.at(row)
            self.memory[start : start + KEY_BYTES] = digest
            return True
        finally:
            self.unlock(row)


class HostCounters:
    """`Holdings` and `Windows` for the processes of one host; see the module docstring."""

    def __init__(self, memory: mmap.mmap, layout: Layout, column: int, fd: int | None) -> None:
        self.memory, self.layout, self.column, self.fd = memory, layout, column, fd
        self._thread_lock = threading.Lock()  # fcntl locks are per process: threads need their own
        self._locks = _Locks(fd)
        holdings, keys, addresses = (
            _Table(memory, offset, rows, words, self._locks) for offset, rows, words in layout.tables()
        )
        self.holdings, self.key_windows, self.address_windows = holdings, keys, addresses
        self.clock = time.monotonic  # system-wide on Linux: every process reads the same clock

    @classmethod
    def in_memory(cls, key_rows: int = 64, address_rows: int = 1024) -> HostCounters:
        """Counters of one process (anonymous memory; pages are only touched where rows are used)."""
        layout = Layout(1, HOLDING_ROWS, key_rows, address_rows)
        memory = mmap.mmap(-1, layout.size)
        return cls(memory, layout, 0, None)

    @classmethod
    def create(cls, path: Path, layout: Layout) -> HostCounters:
        """A new counters file for `layout.columns` serving processes (the supervising process's)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, layout.size)  # sparse: zero pages cost nothing until written
        memory = mmap.mmap(fd, layout.size)
        LAYOUT.pack_into(memory, 0, MAGIC, layout.columns, layout.holding_rows, layout.key_rows,
                         layout.address_rows, 0, 0, 0)  # fmt: skip
        return cls(memory, layout, -1, fd)

    @classmethod
    def attach(cls, path: Path, column: int) -> HostCounters:
        """The counters file the supervising process made, as serving process `column`."""
        fd = os.open(path, os.O_RDWR)
        header = os.pread(fd, LAYOUT.size, 0)
        magic, columns, holding_rows, key_rows, address_rows, *_ = LAYOUT.unpack(header)
        if magic != MAGIC or not 0 <= column < columns:
            os.close(fd)
            raise ValueError(f"{path} is not a counters file with a column {column}")
        layout = Layout(columns, holding_rows, key_rows, address_rows)
        return cls(mmap.mmap(fd, layout.size), layout, column, fd)

    @property
    def shared(self) -> bool:
        """True when other processes count in the same memory."""
        return self.fd is not None

    # Holdings -----------------------------------------------------------------------------------

    def take(self, key: str, cost: int, cap: int) -> bool:
        """Hold `cost` more of `key` if every process's holdings together stay within `cap`."""
        table = self.holdings
        with self._thread_lock:
            row = table.locate(key, _nothing_held, claim=True)
            if row is None:
                return True  # no room to count it: admit, as a limit without a store would
            try:
                held = table.read(row)
                if sum(held) + cost > cap:
                    return False
                held[self.column] += cost
                table.write(row, held)
                return True
            finally:
                table.unlock(row)

    def give(self, key: str, cost: int) -> None:
        """Give back `cost` of `key` this process holds."""
        table = self.holdings
        with self._thread_lock:
            row = table.locate(key, _nothing_held, claim=False)
            if row is not None:
                try:
                    held = table.read(row)
                    held[self.column] = max(0, held[self.column] - cost)
                    table.write(row, held)
                finally:
                    table.unlock(row)

    def held(self, key: str) -> int:
        """Units of `key` every process holds together."""
        table = self.holdings
        with self._thread_lock:
            row = table.locate(key, _nothing_held, claim=False)
            if row is None:
                return 0
            try:
                return sum(table.read(row))
            finally:
                table.unlock(row)

    def reclaim(self, column: int) -> None:
        """Zero what serving process `column` held (it died; the supervisor calls this)."""
        table = self.holdings
        with self._thread_lock:
            for row in range(table.rows):
                if table.key_at(row) == EMPTY:
                    continue
                self._locks.lock(table.at(row))
                try:
                    held = table.read(row)
                    if held[column]:
                        held[column] = 0
                        table.write(row, held)
                finally:
                    table.unlock(row)

    # Windows ------------------------------------------------------------------------------------

    def windows(self, table: str, window: Window) -> WindowCounter:
        """A `Windows` counter over `table` (`keys` or `addresses`) with `window`. Addresses come from
        anyone: when their table is full, a new one evicts the probed row that counted least, so
        filling the table with one failure per address leaves no address uncounted."""
        if table == "keys":
            return WindowCounter(self, self.key_windows, window)
        return WindowCounter(self, self.address_windows, window, evict=True)

    def close(self) -> None:
        """Unmap the memory (and close the file)."""
        self.memory.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _counted(words: list[int]) -> int:
    """What a window row counts now (its ring; the first two words are its bucket and expiry)."""
    return sum(words[2:])


def _nothing_held(words: list[int]) -> bool:
    return not any(words)


class WindowCounter:
    """`Windows` over one table of `HostCounters`."""

    def __init__(self, counters: HostCounters, table: _Table, window: Window, evict: bool = False) -> None:
        self.counters, self.table, self.window = counters, table, window
        self.weight: Weight | None = _counted if evict else None

    def _idle(self, words: list[int]) -> bool:
        return words[1] <= int(self.counters.clock() * 1e9)

    def hit(self, key: str, cost: int = 1) -> Verdict:
        """Count `cost` for `key` if it fits the window."""
        return self._visit(key, cost, count=True)

    def check(self, key: str, cost: int = 1) -> Verdict:
        """Whether `cost` more would fit now (counting nothing)."""
        if cost <= self.window.limit and self.table.rowless(key):
            return FITS  # no row, and none claimed since (no lock needed: see the module docstring)
        return self._visit(key, cost, count=False)

    def _visit(self, key: str, cost: int, count: bool) -> Verdict:
        window, table = self.window, self.table
        with self.counters._thread_lock:
            row = table.locate(key, self._idle, claim=count, weight=self.weight)
            if row is None and cost <= window.limit:
                return FITS  # nothing counted for it (nearly every request's address)
            now = self.counters.clock()
            bucket = int(now / window.bucket_seconds)
            if row is None:
                return verdict([0] * (BUCKETS + 1), bucket, window, cost, now)
            try:
                words = table.read(row)
                ring = words[2:]
                advance(ring, words[0], bucket)
                found = verdict(ring, bucket, window, cost, now)
                if count and found.allowed:
                    ring[bucket % len(ring)] += cost
                    expiry = int((bucket + len(ring)) * window.bucket_seconds * 1e9)
                    table.write(row, [bucket, expiry, *ring])
                return found
            finally:
                table.unlock(row)


def layout_for(settings: Settings, columns: int) -> Layout:
    """The tables `settings` need, for `columns` serving processes."""
    return Layout(columns, HOLDING_ROWS, 2 * len(settings.api_keys) + RUNTIME_KEY_ROWS, ADDRESS_ROWS)


def counters_for(settings: Settings) -> HostCounters:
    """This process's counters: the host's file when a supervising process made one, else its own."""
    if settings.shared_counters_file is not None:
        return HostCounters.attach(settings.shared_counters_file, settings.shared_counters_column)
    layout = layout_for(settings, 1)
    return HostCounters.in_memory(layout.key_rows, layout.address_rows)
