"""A worker's output, kept in size-capped, rotated files.

vLLM logs a line per request and per health probe, so an append-only file grows without end. The
worker writes into a pipe instead; a thread of the gateway copies it line by line into a
`RotatingFileHandler` (stdlib), so nothing of it runs on the event loop and the disk use is bounded
by `max_bytes x (backups + 1)`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from logging.handlers import RotatingFileHandler
from pathlib import Path

MAX_LINE_BYTES = 64 * 1024  # a longer "line" is written in pieces, never buffered whole
TAIL_READ_BYTES = 64 * 1024


class WorkerLog:
    """The files one worker (across its restarts) writes to."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._handler: RotatingFileHandler | None = None
        self._threads: list[threading.Thread] = []

    def _open(self) -> RotatingFileHandler:
        if self._handler is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = RotatingFileHandler(
                self.path, maxBytes=self.max_bytes, backupCount=self.backups, encoding="utf-8"
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._handler = handler
        return self._handler

    def pipe(self) -> int:
        """A pipe for one launch: give the returned write end to the child (and close it here
        once the child has it); a thread copies what comes out until every writer is gone."""
        handler = self._open()
        read_end, write_end = os.pipe()
        thread = threading.Thread(
            target=_copy, args=(read_end, handler), name=f"log:{self.path.name}", daemon=True
        )
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        return write_end

    def close(self, wait: float = 2.0) -> None:
        """Wait briefly for the copying threads (the worker has exited), then close the file."""
        for thread in self._threads:
            thread.join(timeout=wait)
        if self._handler is not None:
            self._handler.close()
            self._handler = None


def _copy(read_end: int, handler: logging.Handler) -> None:
    with open(read_end, "rb") as pipe:
        while line := pipe.readline(MAX_LINE_BYTES):
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            handler.handle(logging.LogRecord("worker", logging.INFO, "", 0, text, None, None))


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a worker's log, reading only the end of the file (call it off the loop)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_READ_BYTES))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "".join(deque(text.splitlines(keepends=True), maxlen=lines))
