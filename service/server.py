"""Run the gateway under uvicorn (uvloop and httptools where installed)."""

from __future__ import annotations

import logging
import signal

import uvicorn

from service.app import create_app
from service.settings import Settings


def configure_logging(level: str) -> None:
    """Plain timestamped lines on stderr."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per health probe drowns everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; the lifespan stops every worker before returning."""
    configure_logging(settings.log_level)
    logging.getLogger(__name__).info(
        "serving on http://%s:%d; models: %s", settings.host, settings.port,
        ", ".join(f"{m.name} ({m.kind.value})" for m in settings.models),
    )  # fmt: skip
    # uvicorn re-raises the signal it handled once shutdown is done; a graceful stop is a success.
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=30,
    )
    if stopped_by:
        logging.getLogger(__name__).info("stopped by %s", signal.Signals(stopped_by[0]).name)
    return 0
