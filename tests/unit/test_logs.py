"""Logging never holds unbounded memory: when the writer is blocked, records beyond the queue's
bound are dropped and counted, and the rest are written once it unblocks."""

from __future__ import annotations

import io
import logging
import threading
import time

from service.ops.logs import DropCount, configure_logging, stop_logging


class BlockedStream(io.StringIO):
    """A stderr whose writes wait until released (a full pipe, a stalled log shipper)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.lines = 0

    def write(self, text: str) -> int:
        self.release.wait()
        self.lines += text.count("\n")
        return len(text)


def test_a_blocked_writer_drops_and_counts_instead_of_growing(monkeypatch: object) -> None:
    stream = BlockedStream()
    monkeypatch.setattr("sys.stderr", stream)  # type: ignore[attr-defined]
    before = DropCount.value
    configure_logging("info", "text", queue_size=100)
    try:
        log = logging.getLogger("test.flood")
        for index in range(1000):
            log.info("record %d", index)
        dropped = DropCount.value - before
        # The writer took one record and blocks on it; at most 100 more wait in the queue.
        assert 1000 - 101 <= dropped <= 1000 - 100
        stream.release.set()
    finally:
        stop_logging()
    assert stream.lines == 1000 - dropped
    time.sleep(0)


def test_the_drop_count_is_exported() -> None:
    from service.ops.metrics import Metrics

    metrics = Metrics(lambda: [])
    text = metrics.exposition().decode()
    assert f"gateway_log_records_dropped_total {float(DropCount.value)}" in text
