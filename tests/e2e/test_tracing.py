"""Tracing on the real stack: a request's trace holds the gateway's spans and, under its upstream
attempt, the span the real vLLM worker exported (the worker was launched with --otlp-traces-endpoint
and given the attempt's context in `traceparent`)."""

from __future__ import annotations

import httpx

from bench.otlp_sink import Sink, tree
from tests.e2e.conftest import PAIR, Stack


def test_the_workers_span_is_a_child_of_the_gateways_attempt(pair: Stack, otlp: Sink) -> None:
    question = {"model": PAIR, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    response = httpx.post(f"{pair.url}/v1/chat/completions", json=question, timeout=120)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]

    def whole(spans: list) -> bool:  # type: ignore[type-arg]
        server = [s for s in spans if s.attributes.get("gateway.request_id") == request_id]
        return bool(server) and any(
            s.trace_id == server[0].trace_id and s.service.startswith("vllm") for s in spans
        )

    spans = otlp.wait_for(whole, seconds=60)
    server = next(s for s in spans if s.attributes.get("gateway.request_id") == request_id)
    trace = [s for s in spans if s.trace_id == server.trace_id]
    print(f"\n{tree(trace)}")  # the README shows this tree
    attempt = next(s for s in trace if s.kind == "client" and s.parent_id == server.span_id)
    vllm = [s for s in trace if s.service.startswith("vllm")]
    assert vllm and all(s.parent_id == attempt.span_id for s in vllm), tree(trace)
    assert vllm[0].service == f"vllm {PAIR}"
    print({k: v for k, v in vllm[0].attributes.items() if k.startswith("gen_ai")})
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 4
