"""Tracing on the real stack: a request's trace holds the gateway's spans and, under its upstream
attempt, the span the real vLLM worker exported (the worker was launched with --otlp-traces-endpoint
and given the attempt's context in `traceparent`), under the caller's own trace: the request comes
from the `openai` client carrying a `traceparent` of its own, as an instrumented app's would."""

from __future__ import annotations

import openai

from bench.otlp_sink import Sink, Span, tree
from tests.e2e.conftest import PAIR, Stack

CALLERS_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLERS_SPAN = "b7ad6b7169203331"


def test_the_workers_span_is_a_child_of_the_gateways_attempt(pair: Stack, otlp: Sink) -> None:
    with openai.OpenAI(base_url=f"{pair.url}/v1", api_key="unused", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=PAIR,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            extra_headers={"traceparent": f"00-{CALLERS_TRACE}-{CALLERS_SPAN}-01"},
        )
    assert raw.parse().usage.completion_tokens == 4  # type: ignore[union-attr]
    request_id = raw.headers["x-request-id"]
    assert raw.headers["server-timing"].startswith("gateway;dur=")

    def whole(spans: list[Span]) -> bool:
        server = [s for s in spans if s.attributes.get("gateway.request_id") == request_id]
        return bool(server) and any(
            s.trace_id == server[0].trace_id and s.service.startswith("vllm") for s in spans
        )

    spans = otlp.wait_for(whole, seconds=60)
    server = next(s for s in spans if s.attributes.get("gateway.request_id") == request_id)
    assert (server.trace_id, server.parent_id) == (CALLERS_TRACE, CALLERS_SPAN)  # the caller's trace
    trace = [s for s in spans if s.trace_id == server.trace_id]
    print(f"\n{tree(trace)}")  # docs/operations/observability.md shows this tree
    attempt = next(s for s in trace if s.kind == "client" and s.parent_id == server.span_id)
    vllm = [s for s in trace if s.service.startswith("vllm")]
    assert vllm and all(s.parent_id == attempt.span_id for s in vllm), tree(trace)
    assert vllm[0].service == f"vllm {PAIR}"
    print({k: v for k, v in vllm[0].attributes.items() if k.startswith("gen_ai")})
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 4
