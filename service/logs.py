"""Logging set-up: JSON lines (one per request from `gateway.access`) or human-readable text.

Records are handed to a queue and formatted and written by a listener thread (the logging cookbook's
"dealing with handlers that block"): a slow stderr (a full pipe, a log shipper pushing back) never
stalls the event loop, and the JSON formatting (~45 us a line) is not done on it either.
"""

from __future__ import annotations

import atexit
import logging
import sys
from logging.handlers import QueueHandler, QueueListener
from queue import SimpleQueue

from pythonjsonlogger.json import JsonFormatter

from service.observe import RequestIdFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"

_listener: QueueListener | None = None


class InProcessQueueHandler(QueueHandler):
    """Merges the message's arguments now (they may change later) but keeps the record otherwise as
    it is: the listener is in this process, so `exc_info` can travel and the JSON formatter still
    writes the traceback as its own field."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record


def configure_logging(level: str, fmt: str) -> None:
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
    records: SimpleQueue[logging.LogRecord] = SimpleQueue()
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
    _listener = QueueListener(records, output)
    _listener.start()


def stop_logging() -> None:
    """Write out every queued record and stop the writer thread (at exit, or before reconfiguring)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop_logging)
