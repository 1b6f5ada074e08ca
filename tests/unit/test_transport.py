"""What every transport shares: framing an event stream, and the stream deadlines; how an HTTP
worker's refusals are read."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from service.errors import UpstreamRejected, UpstreamTimeout, WorkerAuthFailed
from service.workers.fake import FakeStream
from service.workers.http_transport import rejection, translate
from service.workers.transport import OversizedEvent, SseFramer, WatchedStream, sse_payloads
from service.workers.worker import Worker


def test_the_framer_yields_whole_events_whatever_the_reads() -> None:
    framer = SseFramer()
    assert framer.feed(b"data: 1\n") == b""
    assert framer.feed(b"\ndata: 2\n\nda") == b"data: 1\n\ndata: 2\n\n"
    assert framer.feed(b"ta: 3\r\n\r\n") == b"data: 3\n\n"  # CRLF line ends are the same events
    assert framer.feed(b"event: x\ndata: 4") == b"" and framer.rest() == b"event: x\ndata: 4\n\n"
    assert sse_payloads(b"event: e\ndata: {}\n\ndata: [DONE]\n\n") == [b"{}", b"[DONE]"]


def test_line_ends_split_between_reads_still_end_events() -> None:
    framer = SseFramer()
    assert framer.feed(b"data: 1\r") == b"" and framer.feed(b"\n\r") == b""
    assert framer.feed(b"\ndata: 2\n") == b"data: 1\n\n"
    assert framer.feed(b"\n") == b"data: 2\n\n"


def test_an_unfinished_event_may_grow_to_the_limit_and_no_further() -> None:
    framer = SseFramer(limit=100)
    assert framer.feed(b"data: " + b"a" * 50) == b""
    assert framer.feed(b"a" * 42 + b"\n\ndata: b") == b"data: " + b"a" * 92 + b"\n\n"  # 100 bytes
    with pytest.raises(OversizedEvent):
        framer.feed(b"b" * 100)
    framer = SseFramer(limit=100)
    framer.feed(b"data: " + b"a" * 90)
    with pytest.raises(OversizedEvent):  # over the limit by the read that ends it
        framer.feed(b"a" * 10 + b"\n\n")


async def collect(stream: WatchedStream) -> list[bytes]:
    return [block async for block in stream.blocks()]


@pytest.mark.parametrize(
    ("items", "first", "idle", "error"),
    [
        (
            [0.05, b"data: a\n\n", b"data: [DONE]\n\n"],
            0.2,
            0.02,
            None,
        ),  # idle does not apply before the first
        ([0.3, b"data: a\n\n"], 0.1, 10.0, "first token within 0.1 s"),
        ([b"data: a\n\n", 0.3, b"data: b\n\n"], 10.0, 0.1, "next token within 0.1 s"),
        ([b"data: a\n\n", 0.05, b"data: b\n\n", 0.05, b"data: [DONE]\n\n"], 10.0, 0.1, None),
    ],
)
async def test_each_stream_deadline_means_what_it_says(
    items: list[bytes | float], first: float, idle: float, error: str | None
) -> None:
    fake = FakeStream(list(items))
    fake.worker = Worker("m", "http://w")
    watched = WatchedStream(fake, asyncio.get_running_loop().time(), first, idle)
    if error is None:
        assert (await collect(watched))[-1] == b"data: [DONE]\n\n"
    else:
        with pytest.raises(UpstreamTimeout, match=error.replace(".", r"\.")):
            await collect(watched)
    await watched.close()


def test_a_connect_deadline_that_ran_out_is_retried_elsewhere_but_ejects_no_worker() -> None:
    """The deadline counts wall time, which a stalled gateway loop spends too: a healthy worker was
    ejected for the gateway's own stall. A refused connection still ejects at once."""
    worker = Worker(model="m", url="http://127.0.0.1:1")
    timed_out = translate(aiohttp.ConnectionTimeoutError("connect"), worker, 0.5)
    assert isinstance(timed_out, UpstreamTimeout) and timed_out.retryable and not timed_out.eject
    key = ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    refusal = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    refused = translate(refusal, worker, 0.5)
    assert refused.retryable and refused.eject  # type: ignore[attr-defined]


def test_an_error_read_only_in_part_keeps_its_status_and_what_its_start_says() -> None:
    """A 4xx answer over MAX_ERROR_BYTES is read only in part: its message is decoded from that part
    wherever the cut falls (inside an escape or a UTF-8 sequence), never a 502."""
    worker = Worker(model="m", url="http://127.0.0.1:1")
    message = "Too many bad words. (parameter=bad_words, value=" + '\u00e9\u00e8 "q" \U0001f600' * 50
    raw = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": "bad_words"}})
    whole = raw.encode()
    for cut in range(70, 150):  # from just after "(parameter=bad_words,"
        error = rejection(400, whole[:cut], worker, "/v1/chat/completions", whole=False)
        assert isinstance(error, UpstreamRejected) and error.status_code == 400
        assert message.startswith(error.message) and len(error.message) >= cut - 80, (cut, error.message)
        assert error.param == "bad_words"
    unknown = rejection(413, b"<html>" * 100, worker, "/v1/completions", whole=False)
    assert isinstance(unknown, UpstreamRejected) and unknown.status_code == 413
    assert "error was too long to pass on" in unknown.message
    assert not isinstance(rejection(500, b"{}", worker, "/v1/completions", whole=False), UpstreamRejected)


@pytest.mark.parametrize(
    ("status", "body"),
    [(401, b'{"error": "Unauthorized"}'),  # vLLM's --api-key
     (401, b'{"error": {"message": "...", "code": "worker_key_required"}}'),  # the workers' guard
     (403, b"<html>Forbidden</html>")],  # a proxy in front of the worker
)  # fmt: skip
def test_a_worker_refusing_the_key_is_the_gateways_502_not_the_clients_401(status: int, body: bytes) -> None:
    worker = Worker("m", "http://w")
    error = rejection(status, body, worker, "/v1/chat/completions")
    assert isinstance(error, WorkerAuthFailed) and error.status_code == 502
    assert error.retryable and error.eject  # another replica may hold the right key; this one is out
    assert "could not authenticate to the worker for model 'm'" in error.message
    # Other 4xx stay the worker's own answer to the client's request.
    assert isinstance(rejection(400, b'{"error": {"message": "bad n"}}', worker, "/x"), UpstreamRejected)
