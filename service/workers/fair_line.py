"""A model's line of waiting requests, served in turn by caller: each caller (an API key) is first come
first served within its own line, and the callers with requests waiting take turns, so one key that
queues a hundred requests delays only itself; another key's request goes at the next free slot."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """A waiting request: who asks (None: a caller without a key, all such callers one line)."""

    @property
    def caller(self) -> str | None: ...


W = TypeVar("W", bound=Queued)


class FairLine(Generic[W]):
    """Per-caller lines taken in turn; the head is the first waiter of the caller whose turn it is."""

    def __init__(self) -> None:
        self._lines: dict[str | None, deque[W]] = {}
        self._turns: deque[str | None] = deque()  # callers with waiters, whose turn comes first first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __contains__(self, waiter: object) -> bool:
        line = self._lines.get(getattr(waiter, "caller", None))
        return line is not None and waiter in line

    def __iter__(self) -> Iterator[W]:
        for line in self._lines.values():
            yield from line

    def append(self, waiter: W) -> None:
        """At the end of its caller's line (a caller new to the line waits for the others' turns)."""
        line = self._lines.get(waiter.caller)
        if line is None:
            line = self._lines[waiter.caller] = deque()
            self._turns.append(waiter.caller)
        line.append(waiter)
        self._count += 1

    def head(self) -> W:
        """The waiter whose turn it is (the line must not be empty)."""
        return self._lines[self._turns[0]][0]

    def served(self, waiter: W) -> None:
        """`waiter` leaves the line; when it was the head, its caller's turn passes to the next caller."""
        caller = waiter.caller
        line = self._lines[caller]
        was_head = bool(self._turns) and self._turns[0] == caller and line[0] is waiter
        line.remove(waiter)
        self._count -= 1
        if not line:
            del self._lines[caller]
            self._turns.remove(caller)
        elif was_head:
            self._turns.rotate(-1)  # the caller has more waiting: it goes after the others
