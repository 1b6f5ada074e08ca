"""A minimal OTLP/HTTP trace receiver: keeps every span it is sent (tests read them) or just counts
them (the overhead benchmark's collector). Protobuf only, as the OpenTelemetry exporters send it.

    .venv/bin/python -m bench.otlp_sink --port 4318      # a collector that discards
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.workers.supervisor import free_port

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass
class Span:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attributes: dict[str, Any]
    error: bool
    start_ns: int
    end_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        name=span.name,
                        service=str(resource.get("service.name", "")),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        kind=KINDS.get(span.kind, str(span.kind)),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        error=span.status.code == 2,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return spans


@dataclass
class Sink:
    """The receiver's state: the spans so far (unless `keep` is off: then only their count)."""

    keep: bool = True
    spans: list[Span] = field(default_factory=list)
    received: int = 0
    url: str = ""  # where it listens, once served

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            spans = decode(await request.body())
            self.received += len(spans)
            if self.keep:
                self.spans.extend(spans)
            return Response(
                ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf"
            )

        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])

    def wait_for(self, found: Callable[[list[Span]], bool], seconds: float = 20.0) -> list[Span]:
        """The spans, once `found(spans)` holds (AssertionError with what came after `seconds`)."""
        deadline = time.monotonic() + seconds
        while not found(list(self.spans)):
            assert time.monotonic() < deadline, f"spans not as expected: {tree(self.spans)}"
            time.sleep(0.05)
        return list(self.spans)


def tree(spans: list[Span], root: str = "") -> str:
    """The spans as an indented tree (children under their parent), for people."""
    by_parent: dict[str, list[Span]] = {}
    ids = {span.span_id for span in spans}
    for span in spans:
        by_parent.setdefault(span.parent_id if span.parent_id in ids else "", []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s.start_ns):
            mark = " ERROR" if span.error else ""
            lines.append(
                f"{'  ' * depth}{span.name} [{span.service}, {span.kind}] {span.seconds * 1e3:.1f} ms{mark}"
            )
            walk(span.span_id, depth + 1)

    walk(root, 0)
    return "\n".join(lines)


class Receiver:
    """The sink served on a free port from a thread, for tests: `with Receiver() as sink: ...`."""

    def __init__(self, keep: bool = True) -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.sink = Sink(keep, url=self.url)
        config = uvicorn.Config(self.sink.app(), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Sink:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self.sink

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    uvicorn.run(Sink(keep=False).app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
