"""OpenTelemetry tracing: one server span per request, with child spans for rendering, the wait for a
worker slot and each upstream attempt; the attempt's context goes to the worker in `traceparent`, so
vLLM's own span is the attempt's child.

Configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
`OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, ...) and off unless an endpoint
is set (or with `OTEL_SDK_DISABLED=true` / `OTEL_TRACES_EXPORTER=none`). Off, nothing of the SDK is
imported, no thread runs and no span object is made: request code checks `record.span is None`.

Attributes follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`) where they apply.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

TRACES_PATH = "/v1/traces"


def endpoint_from_env(env: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP traces URL the environment configures, or None when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "") == "none":
        return None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return None
    if protocol(env) == "grpc":
        return base
    return base.rstrip("/") + TRACES_PATH


def protocol(env: Mapping[str, str] = os.environ) -> str:
    """`http/protobuf` (the default) or `grpc`."""
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


class Tracing:
    """The gateway's tracer (its own provider, so several apps in one process do not share one)."""

    def __init__(self, endpoint: str, service_version: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "llm-gateway"),
                "service.version": service_version,
            }
        )
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self.tracer = self.provider.get_tracer("llm-gateway", service_version)
        self.propagator = TraceContextTextMapPropagator()
        self._kind, self._status, self._code, self._in = SpanKind, Status, StatusCode, set_span_in_context

    def server_span(self, method: str, path: str, headers: list[tuple[bytes, bytes]], request_id: str) -> Any:
        """The request's span, a child of the caller's `traceparent` when it sent one."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        parent = self.propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=self._kind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "gateway.request_id": request_id},
        )

    @contextmanager
    def child(self, parent: Any, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
        """A span under `parent` for the block; an exception marks it failed and goes on."""
        span = self.tracer.start_span(name, context=self._in(parent), attributes=attributes)
        try:
            yield span
        except BaseException as exc:
            self.fail(span, exc)
            raise
        finally:
            span.end()

    def client_span(self, parent: Any, name: str, attributes: dict[str, Any]) -> Any:
        """An upstream attempt's span (ended by the caller)."""
        return self.tracer.start_span(
            name, context=self._in(parent), kind=self._kind.CLIENT, attributes=attributes
        )

    def headers_for(self, span: Any) -> dict[str, str]:
        """`traceparent` (and `tracestate`) naming `span` as the parent, for the worker request."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._in(span))
        return carrier

    def fail(self, span: Any, exc: BaseException) -> None:
        span.set_status(self._status(self._code.ERROR, type(exc).__name__))
        span.set_attribute("error.type", getattr(exc, "error_type", type(exc).__name__))

    def end_server_span(self, record: Any) -> None:
        """The request is over: what it became goes on its span (GenAI attributes), then it ends."""
        span = record.span
        span.set_attribute("http.response.status_code", record.status or 500)
        if record.model != "unknown":
            span.set_attribute("gen_ai.request.model", record.model)
        if record.prompt_tokens or record.completion_tokens:
            span.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
        if record.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", record.finish_reasons)
        span.set_attribute("gateway.endpoint", record.endpoint)
        gateway, upstream = record.split(time.perf_counter())
        span.set_attribute("gateway.own_seconds", gateway)
        span.set_attribute("gateway.upstream_seconds", upstream)
        if record.error_type is not None:
            span.set_attribute("error.type", record.error_type)
            span.set_status(self._status(self._code.ERROR, record.error_type))
        if record.disconnected:
            span.set_attribute("gateway.client_disconnected", True)
        span.end()

    def shutdown(self) -> None:
        """Send what is buffered and stop the exporter thread."""
        self.provider.shutdown()


def _exporter(endpoint: str) -> Any:
    if protocol() == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; "
                "install it or use http/protobuf"
            ) from exc
        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


def tracing_from_env(service_version: str) -> Tracing | None:
    """The tracer the environment asks for, or None (tracing off: nothing imported)."""
    endpoint = endpoint_from_env()
    return Tracing(endpoint, service_version) if endpoint else None
