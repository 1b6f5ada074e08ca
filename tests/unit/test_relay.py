"""The stream relay: worker bytes pass through a whole read at a time; only blocks holding usage, an
error or `[DONE]` are parsed, and the usage-only event is forwarded only when asked for."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from prometheus_client import Histogram

from service.core.relay import Relay, count_events
from service.ops.metrics import LATENCY_BUCKETS, Metrics, observe_many
from service.ops.record import RequestRecord
from service.workers.worker import Worker

TOKEN = b'data: {"id":"c","choices":[{"index":0,"text":"%s","finish_reason":null}],"usage":null}\n\n'
USAGE = (
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":9}}\n\n'
)
DONE = b"data: [DONE]\n\n"


async def blocks_of(*blocks: bytes) -> AsyncIterator[bytes]:
    for block in blocks:
        yield block


async def relay(*blocks: bytes, forward_usage: bool = False) -> tuple[bytes, RequestRecord]:
    record = RequestRecord(Metrics(lambda: []), "id", "v1_completions", model="m")
    worker = Worker(model="m", url="http://worker")
    out = b"".join(
        [event async for event in Relay(worker, record, None, forward_usage).events(blocks_of(*blocks))]
    )
    return out, record


def payloads(stream: bytes) -> list[str]:
    return [line[6:] for line in stream.decode().split("\n") if line.startswith("data: ")]


async def test_token_blocks_pass_through_unchanged_and_usage_is_dropped_unless_asked() -> None:
    tokens = [TOKEN % text for text in (b"a", b"b", b"c", b"usage", b'\\"error\\": x')]
    out, record = await relay(tokens[0] + tokens[1], tokens[2] + tokens[3] + tokens[4] + USAGE % 5 + DONE)
    assert out == b"".join(tokens) + DONE  # byte for byte, the worker's events; its usage event dropped
    assert record.completion_tokens == 5 and record.prompt_tokens == 3
    assert record.first_token_at is not None


async def test_usage_is_forwarded_when_asked_for() -> None:
    out, _ = await relay(TOKEN % b"a" + USAGE % 1 + DONE, forward_usage=True)
    assert [json.loads(p).get("usage") for p in payloads(out)[:-1]] == [
        None,
        {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 9},
    ]
    assert payloads(out)[-1] == "[DONE]"


async def test_an_error_event_mid_block_ends_the_stream_with_the_error_then_done() -> None:
    error = b'data: {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}\n\n'
    out, record = await relay(TOKEN % b"a" + error + TOKEN % b"never")
    events = payloads(out)
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    assert json.loads(events[1])["error"]["message"] == "boom"
    assert events[2:] == ["[DONE]"]
    assert record.error_type is not None


async def test_a_stream_without_done_still_ends_with_done() -> None:
    out, _ = await relay(TOKEN % b"a")
    assert payloads(out)[-1] == "[DONE]" and len(payloads(out)) == 2


def test_count_events_counts_data_lines_not_text() -> None:
    assert count_events(TOKEN % b"data: inside text" + TOKEN % b"b") == 2
    assert count_events(b": comment\n\n" + TOKEN % b"a") == 1


def test_observe_many_equals_observing_one_at_a_time() -> None:
    one = Histogram("one", "x", buckets=LATENCY_BUCKETS, registry=None)
    many = Histogram("many", "x", buckets=LATENCY_BUCKETS, registry=None)
    for value, count in ((0.0, 7), (0.003, 2), (0.2, 1), (1000.0, 3)):
        for _ in range(count):
            one.observe(value)
        observe_many(many, value, count)
    samples = {
        s.name.replace("one", "h"): s.value
        for s in next(iter(one.collect())).samples
        if "created" not in s.name
    }
    other = {
        s.name.replace("many", "h"): s.value
        for s in next(iter(many.collect())).samples
        if "created" not in s.name
    }
    assert samples == other and samples["h_count"] == 13


LAST = b'data: {"id":"c","choices":[{"index":0,"text":"z","finish_reason":"length"}]}\n\n'
FINGERPRINTED_USAGE = (
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},'
    b'"system_fingerprint":"vllm-0.32.0-abc"}\n\n'
)


async def test_a_last_event_carries_the_fingerprint_of_the_dropped_usage_event_as_vllm_writes_it() -> None:
    """Asked for no usage, vLLM writes its fingerprint on each choice's last event; the gateway asks for
    usage (it counts tokens), so vLLM puts it on the usage event instead, which the client must not get."""
    out, record = await relay(TOKEN % b"a", LAST + FINGERPRINTED_USAGE + DONE)
    events = [json.loads(p) for p in payloads(out)[:-1]]
    assert [e["choices"][0]["text"] for e in events] == ["a", "z"]  # no usage event
    assert "system_fingerprint" not in events[0] and events[1]["system_fingerprint"] == "vllm-0.32.0-abc"
    assert record.completion_tokens == 2
    asked, _ = await relay(TOKEN % b"a", LAST + FINGERPRINTED_USAGE + DONE, forward_usage=True)
    assert asked == TOKEN % b"a" + LAST + FINGERPRINTED_USAGE + DONE  # asked: the worker's events as they are


async def test_a_held_last_event_is_not_lost_when_no_usage_event_comes() -> None:
    out, _ = await relay(TOKEN % b"a" + LAST)
    assert [json.loads(p)["choices"][0]["text"] for p in payloads(out)[:-1]] == ["a", "z"]
