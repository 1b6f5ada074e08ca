"""The gateway's request steps on the in-memory transport: failover, ejection, the stale-connection
retry, stream deadlines, the drain and a client leaving, all without a socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from service.core.gateway import Gateway
from service.core.relay import OPENAI_STREAM
from service.core.served import ServedModel
from service.errors import (
    ShuttingDown,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    WorkerAuthFailed,
)
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.fake import FakeStream, FakeTransport
from service.workers.pool import Capacity, ModelPool, Worker
from tests.helpers import AsgiCall, call_asgi, eventually, outstanding, sse_data

ANSWER = {
    "id": "cmpl-1",
    "choices": [{"index": 0, "text": "hi"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1},
}


def token(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def gateway_with(*workers: Worker, **settings: Any) -> tuple[Gateway, FakeTransport, ServedModel]:
    """A gateway over a fake transport, and its one model (no tokenizer: these tests send bodies as built)."""
    spec = ModelSpec(name="m", kind=ModelKind.BASE, urls=["http://unused"], tokenizer="unused")
    pool = ModelPool(spec, list(workers), Capacity(per_worker=4, queue=4, queue_timeout=1))
    fake = FakeTransport()
    metrics = Metrics(lambda: [])
    gateway = Gateway(Settings(models=[spec], **settings), {"m": pool}, {}, fake, metrics, set())
    return gateway, fake, ServedModel("m", ModelKind.BASE, None, pool)  # type: ignore[arg-type]


def record_of(gateway: Gateway) -> RequestRecord:
    return RequestRecord(gateway.metrics, "id", "v1_completions", model="m")


def up(name: str) -> Worker:
    return Worker("m", f"http://{name}", name=name, up=True)


async def test_a_worker_failing_before_it_answers_is_retried_once_on_another() -> None:
    a, b = up("a"), up("b")
    gateway, fake, pool = gateway_with(a, b)
    b.outstanding = 1  # a is picked first
    fake.reply(a, UpstreamUnavailable("a failed", retryable=True))
    fake.reply(b, ANSWER)
    assert (await gateway.generate(pool, {"prompt": "x"}, record_of(gateway))).data == ANSWER
    assert [name for name, _, _ in fake.sent] == ["a", "b"]
    b.outstanding = 0
    assert outstanding(gateway) == 0


async def test_a_workers_refusal_is_not_retried() -> None:
    a, b = up("a"), up("b")
    gateway, fake, pool = gateway_with(a, b)
    fake.reply(a, UpstreamRejected(400, {"error": {"message": "no"}}))
    fake.reply(b, UpstreamRejected(400, {"error": {"message": "no"}}))
    with pytest.raises(UpstreamRejected):
        await gateway.generate(pool, {}, record_of(gateway))
    assert len(fake.sent) == 1 and outstanding(gateway) == 0


async def test_an_unreachable_worker_is_ejected_and_the_other_serves() -> None:
    a, b = up("a"), up("b")
    gateway, fake, pool = gateway_with(a, b)
    b.outstanding = 1
    fake.reply(a, UpstreamUnavailable("a is unreachable", retryable=True, eject=True))
    fake.reply(b, ANSWER)
    await gateway.generate(pool, {}, record_of(gateway))
    assert not a.healthy and b.healthy


async def test_a_worker_refusing_the_gateways_key_is_ejected_with_the_reason() -> None:
    a, b = up("a"), up("b")
    gateway, fake, pool = gateway_with(a, b)
    b.outstanding = 1
    fake.reply(a, WorkerAuthFailed("m", 401))
    fake.reply(b, ANSWER, WorkerAuthFailed("m", 403))
    await gateway.generate(pool, {}, record_of(gateway))  # the other replica serves
    assert not a.healthy and "could not authenticate to the worker" in a.down_reason
    b.outstanding = 0
    with pytest.raises(WorkerAuthFailed) as refused:  # no replica left: the client hears why, as a 502
        await gateway.generate(pool, {}, record_of(gateway))
    assert refused.value.status_code == 502
    assert refused.value.envelope()["error"]["code"] == "worker_auth_failed"
    assert outstanding(gateway) == 0


async def test_a_stale_connection_is_retried_on_the_only_worker() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a)
    fake.reply(a, UpstreamUnavailable("closed", retryable=True, stale=True), ANSWER)
    assert (await gateway.generate(pool, {}, record_of(gateway))).data == ANSWER
    assert len(fake.sent) == 2


async def test_a_failure_with_no_other_replica_is_the_clients_error() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a)
    fake.reply(a, UpstreamUnavailable("a failed", retryable=True))
    with pytest.raises(UpstreamUnavailable, match="a failed"):
        await gateway.generate(pool, {}, record_of(gateway))
    assert outstanding(gateway) == 0


async def run_stream(gateway: Gateway, pool: ModelPool, call: AsgiCall | None = None) -> AsgiCall:
    response = await gateway.stream(pool, {"prompt": "x", "stream": True}, record_of(gateway), None)
    return await call_asgi(response, "POST", "/v1/completions", call=call)


async def test_a_stream_passes_through_and_lets_go() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a)
    stream = FakeStream([token("Hel"), token("lo"), DONE])
    fake.reply(a, stream)
    call = await run_stream(gateway, pool)
    assert [json.loads(p)["choices"][0]["text"] for p in sse_data(call.body)[:-1]] == ["Hel", "lo"]
    assert sse_data(call.body)[-1] == "[DONE]"
    assert stream.closed and not stream.aborted and outstanding(gateway) == 0 and not gateway.streams


@pytest.mark.parametrize(
    ("items", "limits", "says"),
    [
        ([0.4, token("late"), DONE], {"first_token_timeout": 0.1}, "sent no first token within 0.1 s."),
        (
            [token("a"), 0.4, token("b"), DONE],
            {"idle_token_timeout": 0.1},
            "sent no next token within 0.1 s.",
        ),
    ],
)
async def test_stream_deadlines_end_it_with_an_error_event(
    items: list[Any], limits: dict[str, float], says: str
) -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a, **limits)
    stream = FakeStream(items)
    fake.reply(a, stream)
    payloads = sse_data((await run_stream(gateway, pool)).body)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["message"].endswith(says)
    assert stream.aborted and outstanding(gateway) == 0


async def test_a_first_token_limit_covers_opening_the_stream() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a, first_token_timeout=0.1)

    async def slow_open(*_: Any) -> FakeStream:
        await asyncio.sleep(1)
        raise AssertionError("not reached")

    fake.stream = slow_open  # type: ignore[method-assign]
    with pytest.raises(UpstreamTimeout, match=r"first token within 0\.1 s"):
        await gateway.stream(pool, {}, record_of(gateway), None)
    assert outstanding(gateway) == 0


async def test_the_drain_ends_open_streams_cleanly() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a)
    fake.reply(a, FakeStream([token("a"), 30.0, DONE]))
    task = asyncio.ensure_future(run_stream(gateway, pool))
    await eventually(lambda: gateway.streams)
    for stream in list(gateway.streams):
        stream.end(ShuttingDown("The gateway is shutting down."))
    payloads = sse_data((await task).body)
    assert json.loads(payloads[-2])["error"]["code"] == "shutting_down" and payloads[-1] == "[DONE]"
    assert outstanding(gateway) == 0


async def test_a_client_leaving_mid_stream_aborts_it_upstream() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a)
    stream = FakeStream([token("a"), 30.0, DONE])
    fake.reply(a, stream)
    call = AsgiCall()
    task = asyncio.ensure_future(run_stream(gateway, pool, call))
    await eventually(lambda: b"data:" in call.body)
    call.leave.set()
    await asyncio.wait_for(task, timeout=5)
    assert stream.aborted and outstanding(gateway) == 0


async def test_usage_the_client_did_not_ask_for_is_counted_not_sent() -> None:
    a = up("a")
    gateway, fake, pool = gateway_with(a)
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    fake.reply(a, FakeStream([token("a") + token("b") + usage + DONE]))
    record = record_of(gateway)
    response = await gateway.stream(pool, {}, record, None, forward_usage=False, fmt=OPENAI_STREAM)
    payloads = sse_data((await call_asgi(response, "POST", "/v1/completions")).body)
    assert all("usage" not in p for p in payloads)
    assert (record.prompt_tokens, record.completion_tokens) == (3, 2)
