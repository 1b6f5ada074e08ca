"""Run the gateway under uvicorn (uvloop and httptools where installed)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.drain import Drain
from service.api.http_protocol import ClientLimits, guarded_protocol
from service.api.processes import clear_metrics_dir, process_count, serve_many
from service.errors import GatewayError
from service.ops.logs import configure_logging
from service.ops.settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains (see service.api.drain); a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._drain_task is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        try:
            await self.drain.run()
        finally:
            super().handle_exit(sig, None)


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for the gateway: its protocol guards slow clients (see http_protocol)."""
    metrics = app.state.metrics

    def count(error: GatewayError) -> None:
        metrics.child(metrics.errors, "connection", error.error_type).inc()

    limits = ClientLimits(
        settings.header_timeout,
        settings.max_header_bytes,
        settings.max_connections,
        settings.body_timeout,
        count,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the handlers configure_logging installed
        access_log=False,  # the gateway writes its own access line (gateway.access)
        loop="auto",
        http=guarded_protocol(limits),
        lifespan="on",  # a failing start-up stops the server instead of serving without state
        timeout_graceful_shutdown=5,  # the drain already gave requests their time
        timeout_keep_alive=settings.keep_alive_timeout,
        proxy_headers=False,  # the gateway does not use client addresses: skip uvicorn's rewriting layer
    )


def serve(settings: Settings, sock: socket.socket | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the lifespan stops every worker before returning. With several
    processes (GATEWAY_PROCESSES), this one supervises them (see service.api.processes); `sock` is
    the listening socket a serving process inherited."""
    configure_logging(settings.log_level, settings.log_format, settings.log_queue_size)
    count = process_count(settings) if sock is None else 1
    if count > 1:
        return serve_many(settings, count)
    if sock is None:  # serving alone (a supervisor's serving processes are given its socket)
        clear_metrics_dir(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # an earlier run's counts go
        logging.getLogger(__name__).info(
            "serving on http://%s:%d; models: %s", settings.host, settings.port,
            ", ".join(f"{m.name} ({m.kind.value})" for m in settings.models),
        )  # fmt: skip
    # uvicorn re-raises the signal it handled once shutdown is done; a graceful stop is a success.
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    app = create_app(settings)
    DrainingServer(server_config(app, settings), app.state.drain).run(sockets=[sock] if sock else None)
    if stopped_by:
        logging.getLogger(__name__).info("stopped by %s", signal.Signals(stopped_by[0]).name)
    return 0
