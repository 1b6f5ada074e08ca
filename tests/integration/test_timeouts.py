"""Each upstream timeout means what it says: a stand-in that waits just under a limit is served,
one that waits just over it gets a 504 (or, mid-stream, an SSE error event) naming that limit.
The old bug this guards against: the first-token limit was really the idle limit (aiohttp's
per-read timeout fired first), while the error claimed the first-token one."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import pytest

from tests.helpers import stream_payloads
from tests.integration.conftest import first_replica_first, running_gateway, standin_settings
from tests.integration.standin import Script

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}
UNDER, OVER = 0.5, 1.6  # seconds the stand-in waits, around a 1 s limit
LIMIT = 1.0


@pytest.mark.parametrize(("delay", "served"), [(UNDER, True), (OVER, False)])
async def test_first_token_limit(standin_url: str, script: Script, delay: float, served: bool) -> None:
    # The idle limit is shorter than the wait: it must not apply before the first token.
    script.first_token_delay = delay
    settings = standin_settings(standin_url, first_token_timeout=LIMIT, idle_token_timeout=0.2)
    async with running_gateway(settings) as (_, http):
        payloads = await stream_payloads(http, "/chat", CHAT)
    assert payloads[-1] == "[DONE]"
    if served:
        assert "error" not in payloads[-2] and json.loads(payloads[0])["delta"] == "Hello"
    else:
        error = json.loads(payloads[-2])["error"]
        assert error["type"] == "timeout"
        assert error["message"].endswith("sent no first token within 1 s.")


@pytest.mark.parametrize(("delay", "served"), [(UNDER, True), (OVER, False)])
async def test_idle_token_limit(standin_url: str, script: Script, delay: float, served: bool) -> None:
    script.token_delay = delay
    script.tokens = ["a", "b", "c"]
    settings = standin_settings(standin_url, first_token_timeout=30, idle_token_timeout=LIMIT)
    async with running_gateway(settings) as (_, http):
        payloads = await stream_payloads(http, "/chat", CHAT)
    if served:
        assert [json.loads(p).get("delta") for p in payloads[:3]] == ["a", "b", "c"]
    else:
        assert json.loads(payloads[0])["delta"] == "a"
        error = json.loads(payloads[-2])["error"]
        assert error["message"].endswith("sent no next token within 1 s.")


@pytest.mark.parametrize(("delay", "served"), [(UNDER, True), (OVER, False)])
async def test_non_streamed_answer_limit(
    standin_url: str, script: Script, delay: float, served: bool
) -> None:
    script.first_token_delay = delay
    async with running_gateway(standin_settings(standin_url, read_timeout=LIMIT)) as (_, http):
        response = await http.post("/chat", json=CHAT)
    if served:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 504
        assert response.json()["error"]["message"].endswith("did not answer within 1 s.")


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[str]:
    """A port whose backlog is full: the kernel drops new connection attempts, so connecting hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (its length is backlog + 1)
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_limit(standin_url: str) -> None:
    with unaccepting_listener() as silent:
        settings = standin_settings(silent, connect_timeout=0.5, health_interval=60)
        async with running_gateway(settings) as (app, http):
            for pool in app.state.gateway.pools.values():
                pool.workers[0].mark(True)  # as if it had answered a probe before
                pool.workers[0].max_model_len = 2048
            response = await http.post("/chat", json=CHAT)
            assert response.status_code == 504, response.text
            assert response.json()["error"]["message"].endswith("did not accept a connection within 0.5 s.")
            # The deadline may have run out on a stalled gateway loop: the verdict is the health check's.
            assert app.state.gateway.pools["chat"].workers[0].healthy


async def test_connect_limit_fails_over_to_a_replica_that_answers(standin_url: str, script: Script) -> None:
    with unaccepting_listener() as silent:
        settings = standin_settings(silent, standin_url, connect_timeout=0.5, health_interval=60)
        async with running_gateway(settings) as (app, http):
            with first_replica_first(app.state.gateway.pools["chat"]):  # the silent one
                response = await http.post("/chat", json=CHAT)
            assert response.status_code == 200, response.text
            assert len(script.bodies) == 1
