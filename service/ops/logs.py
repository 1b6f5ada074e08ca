"""Logging set-up: JSON lines (one per request from `gateway.access`) or human-readable text.

Records are handed to a queue and formatted and written by a listener thread (the logging cookbook's
"dealing with handlers that block"): a slow stderr (a full pipe, a log shipper pushing back) never
stalls the event loop, and the JSON formatting (~45 us a line) is not done on it either. The queue
is bounded: when the writer cannot keep up, new records are dropped and counted
(`gateway_log_records_dropped_total`) rather than held in memory without limit.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import sys
from logging.handlers import QueueHandler, QueueListener
from queue import Full, Queue

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"

DEFAULT_QUEUE_SIZE = 10_000
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_listener: BoundedQueueListener | None = None


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


class BoundedQueueListener(QueueListener):
    """Stops even when the queue is full (the writer catching up) and never hangs the exit."""

    STOP_SECONDS = 5.0

    def enqueue_sentinel(self) -> None:
        with contextlib.suppress(Full):
            self.queue.put(self._sentinel, timeout=self.STOP_SECONDS)  # type: ignore[attr-defined]

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self.enqueue_sentinel()
            thread.join(timeout=self.STOP_SECONDS)
            self._thread = None


def configure_logging(level: str, fmt: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
    """Route every logger (uvicorn's too) through one queue to one writer in the chosen format."""
    global _listener
    stop_logging()
    output = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        output.setFormatter(
            JsonFormatter(
                JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time", "name": "logger"}
            )
        )
    else:
        output.setFormatter(logging.Formatter(TEXT_FORMAT))
    records: Queue[logging.LogRecord] = Queue(maxsize=queue_size)
    handler = InProcessQueueHandler(records)
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
    _listener = BoundedQueueListener(records, output)
    _listener.start()


def stop_logging() -> None:
    """Write out every queued record and stop the writer thread (at exit, or before reconfiguring)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop_logging)
