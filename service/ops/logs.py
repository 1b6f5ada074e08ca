"""Logging set-up: JSON lines (one per request from `gateway.access`) or human-readable text.

Records are handed to a bounded queue and formatted and written by a writer thread (the logging
cookbook's "dealing with handlers that block", with QueueHandler on the producing side): a slow stderr
(a full pipe, a log shipper pushing back) never stalls the event loop, and the formatting is not done
on it either. The writer is not woken per record: it drains the queue every `FLUSH_SECONDS` and writes
each batch with one call (a wake-up and a write per record cost more CPU per request than the record
itself; bench/README.md has the numbers). When it cannot keep up, new records are dropped and counted
(`gateway_log_records_dropped_total`) rather than held in memory without limit.
"""

from __future__ import annotations

import atexit
import contextvars
import io
import logging
import sys
import threading
from collections import deque
from logging.handlers import QueueHandler
from queue import Full
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"

DEFAULT_QUEUE_SIZE = 10_000
FLUSH_SECONDS = 0.05
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_writer: LogWriter | None = None


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class DropCount:
    """Records dropped because the log queue was full (read by the metrics at scrape time)."""

    value = 0


class InProcessQueueHandler(QueueHandler):
    """Merges the message's arguments now (they may change later) but keeps the record otherwise as
    it is: the listener is in this process, so `exc_info` can travel and the JSON formatter still
    writes the traceback as its own field. A full queue drops the record and counts it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except Full:
            DropCount.value += 1


class BoundedQueue:
    """What QueueHandler puts records into: a deque with a bound, and no consumer to notify."""

    def __init__(self, maxsize: int) -> None:
        self.records: deque[logging.LogRecord] = deque()
        self.maxsize = maxsize

    def put_nowait(self, record: logging.LogRecord) -> None:
        if len(self.records) >= self.maxsize:
            raise Full
        self.records.append(record)


class LogWriter(threading.Thread):
    """Formats and writes the queued records in batches, off the event loop."""

    def __init__(self, queue: BoundedQueue, handler: logging.Handler, stream: TextIO) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.queue = queue
        self.handler = handler  # formats into `buffer`; one write of the batch to `stream`
        self.buffer = io.StringIO()
        handler.setStream(self.buffer)  # type: ignore[attr-defined]
        self.stream = stream
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(FLUSH_SECONDS):
            self.drain()
        self.drain()

    def drain(self) -> None:
        records = self.queue.records
        while records:
            self.handler.handle(records.popleft())
            if self.buffer.tell() > 1 << 16 or not records:  # write in batches of up to 64 KiB
                self.stream.write(self.buffer.getvalue())
                self.stream.flush()
                self.buffer.seek(0)
                self.buffer.truncate()

    def stop(self, wait: float = 5.0) -> None:
        self.stopping.set()
        self.join(timeout=wait)


def configure_logging(level: str, fmt: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
    """Route every logger (uvicorn's too) through one queue to one writer in the chosen format."""
    global _writer
    stop_logging()
    output = logging.StreamHandler()
    if fmt == "json":
        output.setFormatter(
            JsonFormatter(
                JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time", "name": "logger"}
            )
        )
    else:
        output.setFormatter(logging.Formatter(TEXT_FORMAT))
    records = BoundedQueue(queue_size)
    handler = InProcessQueueHandler(records)  # type: ignore[arg-type]
    handler.addFilter(RequestIdFilter())  # here, in the caller's context: the request id is a context var
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The access log line per request comes from `gateway.access`; uvicorn's would repeat it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # No format here uses the caller's file/line, thread or process: don't collect them per record
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    _writer = LogWriter(records, output, sys.stderr)
    _writer.start()


def stop_logging() -> None:
    """Write out every queued record and stop the writer thread (at exit, or before reconfiguring)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


atexit.register(stop_logging)
