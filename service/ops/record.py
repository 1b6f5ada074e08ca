"""What one counted request did: filled in as it goes (model, tokens, first token, failure) and
reported once when it ends, as metrics and one structured log line (`gateway.access`). Observation
only: it steers nothing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from service.errors import ClientDisconnected, GatewayError
from service.ops.metrics import Metrics, observe_many
from service.ops.settings import UNKNOWN_MODEL

log = logging.getLogger("gateway.access")


@dataclass
class RequestRecord:
    """What one generation request did, filled in as it goes and reported when it ends."""

    metrics: Metrics
    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    model: str = UNKNOWN_MODEL
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    error_type: str | None = None
    disconnected: bool = False
    admitted: bool = False
    upstream_seconds: float = 0.0  # time spent waiting on workers (send to last byte), attempts summed
    upstream_since: float | None = None  # when the worker call under way began
    sent: bool = False  # the request itself went to a worker (not only a load of its adapter)
    span: Any = None  # the request's trace span, when tracing is on
    trace_id: str | None = None  # for the access log: the span's, else the caller's traceparent's
    finish_reasons: list[str] = field(default_factory=list)
    token_events: int = 0  # generated-token events that reached the client (a whole answer: one)

    def admit(self, model: str) -> None:
        """The request is for a served model: it counts as in flight until it ends."""
        self.model = model
        self.admitted = True
        self.metrics.child(self.metrics.in_flight, model).inc()

    def token_sent(self) -> None:
        """A generated token (or a whole non-streamed answer) reached the client's side."""
        now = time.perf_counter()
        self.token_events += 1
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            itl = self.metrics.child(self.metrics.itl, self.endpoint, self.model)
            itl.observe(now - self.last_token_at)  # type: ignore[operator]
        self.last_token_at = now

    def tokens_sent(self, count: int) -> None:
        """`count` token events reached the client's side together (one write)."""
        if count <= 0:
            return
        self.token_sent()
        self.token_events += count - 1
        if count > 1:  # the others arrived in the same write as the first: no gap
            observe_many(self.metrics.child(self.metrics.itl, self.endpoint, self.model), 0.0, count - 1)

    def upstream_started(self) -> None:
        """A call to a worker begins (an attempt, or a stream being opened)."""
        self.upstream_since = time.perf_counter()

    def upstream_ended(self) -> None:
        """The worker call under way is over (answered, failed, or its stream closed)."""
        if self.upstream_since is not None:
            self.upstream_seconds += time.perf_counter() - self.upstream_since
            self.upstream_since = None

    def split(self, now: float) -> tuple[float, float]:
        """(gateway, upstream) seconds of the request so far: the worker calls, and the rest."""
        upstream = self.upstream_seconds
        if self.upstream_since is not None:
            upstream += now - self.upstream_since
        return now - self.started - upstream, upstream

    def set_usage(self, usage: dict[str, Any] | None) -> None:
        """Token counts as the worker reported them (chat/completions or Responses API names)."""
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)

    def failed(self, error: GatewayError) -> None:
        """The one place a failure is counted (a client that left is a disconnect, not an error)."""
        if isinstance(error, ClientDisconnected):
            self.disconnected = True
        else:
            self.error_type = error.error_type

    def finish(self) -> None:
        """Report the request: metrics, then one log line."""
        m = self.metrics
        ended = time.perf_counter()
        duration = ended - self.started
        status = str(self.status or 500)
        endpoint, model = self.endpoint, self.model
        m.child(m.requests, endpoint, model, status).inc()
        m.child(m.duration, endpoint, model, status).observe(duration)
        self.upstream_ended()
        own, upstream = self.split(ended)
        m.child(m.own_time, endpoint, model).observe(own)
        if upstream:
            m.child(m.upstream_time, endpoint, model).observe(upstream)
        ttft = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.started
            m.child(m.ttft, endpoint, model).observe(ttft)
        if self.prompt_tokens:
            m.child(m.prompt_tokens, model).inc(self.prompt_tokens)
        if self.completion_tokens:
            m.child(m.completion_tokens, model).inc(self.completion_tokens)
        if self.error_type is not None:
            m.child(m.errors, endpoint, self.error_type).inc()
        if self.disconnected:
            m.child(m.disconnects, endpoint, model).inc()
        if self.admitted:
            m.child(m.in_flight, model).dec()
        log.info(
            "%s model=%s status=%s tokens=%d+%d ttft=%s duration=%.3fs%s",
            self.endpoint, self.model, status, self.prompt_tokens, self.completion_tokens,
            f"{ttft:.3f}s" if ttft is not None else "-", duration,
            " (client disconnected)" if self.disconnected else "",
            extra={
                "request_id": self.request_id,
                "endpoint": self.endpoint,
                "model": self.model,
                "status": int(status),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "ttft_s": round(ttft, 4) if ttft is not None else None,
                "duration_s": round(duration, 4),
                "error_type": self.error_type,
                "client_disconnected": self.disconnected,
                "gateway_s": round(own, 4),
                "upstream_s": round(upstream, 4),
                "trace_id": self.trace_id,
            },
        )  # fmt: skip
