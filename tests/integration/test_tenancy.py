"""Tenancy through the real app and the stand-in worker: every path that sends a worker a request
carries the caller's cache salt (streamed or not, built by the gateway or the client's own bytes), a
client cannot choose it, nothing changes without keys; `priority` and stored responses are refused;
the workers' own key goes with every request and probe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.core import tenancy
from service.core.tenancy import Tenancy, key_id
from service.ops.settings import Settings
from tests.integration.conftest import running_gateway, serve_in_background, standin_settings
from tests.integration.standin import Script, build_app

MESSAGES = [{"role": "user", "content": "Hi"}]
COMMON = ["model", "stream", "stream_options", "n", "max_tokens", "cache_salt", "priority"]
SCHEMA = {
    "CompletionRequest": [*COMMON, "prompt", "echo", "logprobs", "prompt_logprobs"],
    "ChatCompletionRequest": [*COMMON, "messages"],
    "BatchChatCompletionRequest": [*COMMON, "messages"],
    "ResponsesRequest": [*COMMON, "input", "previous_response_id", "background", "store"],
}
KEYS = "alpha,beta,gamma"
GROUPS = {"team": [key_id("alpha"), key_id("gamma")]}
# Every path that sends the worker a request: (path, body); each also streamed where it streams.
PATHS: list[tuple[str, dict[str, Any]]] = [
    ("/complete", {"prompt": "Once upon a time", "max_tokens": 4}),
    ("/chat", {"messages": MESSAGES, "max_tokens": 4}),
    ("/v1/completions", {"model": "base", "prompt": "Once upon a time"}),
    ("/v1/completions", {"model": "base", "prompt": [1, 2, 3]}),
    ("/v1/completions", {"prompt": "no model named: the gateway fills it in"}),
    ("/v1/chat/completions", {"model": "chat", "messages": MESSAGES}),
    ("/v1/responses", {"model": "chat", "input": "Hi"}),
]


def keyed(url: str, **overrides: Any) -> Settings:
    return standin_settings(url, api_keys=KEYS, cache_groups=GROUPS, **overrides)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed_gateway(standin_url: str, script: Script) -> AsyncIterator[tuple[httpx.AsyncClient, Tenancy]]:
    script.schema = SCHEMA
    settings = keyed(standin_url)
    async with running_gateway(settings) as (_, http):
        yield http, Tenancy.from_settings(settings)


def salt_of(callers: Tenancy, key: str, client_salt: str | None = None) -> str | None:
    return callers.caller(key_id(key)).salt_for(client_salt)


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    if body.get("stream"):
        async with http.stream("POST", path, json=body, headers=auth(key)) as response:
            await response.aread()
            return response
    return await http.post(path, json=body, headers=auth(key))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), PATHS)
async def test_every_worker_request_carries_the_callers_salt(
    keyed_gateway: tuple[httpx.AsyncClient, Tenancy],
    script: Script,
    path: str,
    body: dict[str, Any],
    stream: bool,
) -> None:
    http, callers = keyed_gateway
    seen = []
    for key in ("alpha", "beta", "gamma"):
        response = await post(http, path, {**body, "stream": stream}, key)
        assert response.status_code == 200, response.text
        seen.append(script.bodies[-1]["cache_salt"])
    assert seen == [salt_of(callers, "alpha"), salt_of(callers, "beta"), salt_of(callers, "alpha")]
    assert seen[0] != seen[1]  # alpha and gamma share their group's cache; beta has its own


async def test_batch_chat_and_scoring_carry_the_salt_too(
    keyed_gateway: tuple[httpx.AsyncClient, Tenancy], script: Script
) -> None:
    http, callers = keyed_gateway
    batch = {"model": "chat", "messages": [MESSAGES, MESSAGES]}
    assert (await post(http, "/v1/chat/completions/batch", batch, "beta")).status_code == 200
    assert script.bodies[-1]["cache_salt"] == salt_of(callers, "beta")
    # The stand-in has no prompt logprobs: the answer is refused, but the request it got counts here.
    await post(http, "/complete", {"prompt": "The capital of France is", "continuation": " Paris"}, "beta")
    assert script.bodies[-1]["prompt_logprobs"] == 0 and script.bodies[-1]["cache_salt"] == salt_of(
        callers, "beta"
    )


async def test_a_clients_own_salt_is_replaced_by_one_derived_from_it(
    keyed_gateway: tuple[httpx.AsyncClient, Tenancy], script: Script
) -> None:
    http, callers = keyed_gateway
    victim = salt_of(callers, "beta")
    assert victim is not None
    for path, body in PATHS[2:]:  # the /v1 paths: the client's own bytes go on, the salt spliced in
        response = await post(http, path, {**body, "cache_salt": victim}, "alpha")
        assert response.status_code == 200, response.text
        sent = script.bodies[-1]
        assert sent["cache_salt"] == salt_of(callers, "alpha", victim) != victim
        assert {k: v for k, v in sent.items() if k != "cache_salt"} == {"model": sent["model"], **body}
    refused = await post(http, "/v1/completions", {"model": "base", "prompt": "x", "cache_salt": ""}, "alpha")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"


async def test_without_keys_the_worker_gets_what_the_client_sent(standin_url: str, script: Script) -> None:
    script.schema = SCHEMA
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        for path, body in PATHS:
            assert (await http.post(path, json=body)).status_code == 200
            assert "cache_salt" not in script.bodies[-1]
        mine = {"model": "base", "prompt": "x", "cache_salt": "my-own"}
        assert (await http.post("/v1/completions", json=mine)).status_code == 200
        assert script.bodies[-1] == mine


async def test_a_worker_that_takes_no_cache_salt_gets_none(
    standin_url: str, script: Script, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenancy, "_warned", set())
    script.schema = {"CompletionRequest": ["model", "prompt", "stream"]}
    async with running_gateway(keyed(standin_url)) as (_, http):
        response = await http.post(
            "/v1/completions", json={"model": "base", "prompt": "x"}, headers=auth("alpha")
        )
        assert response.status_code == 200 and "cache_salt" not in script.bodies[-1]
    assert any("takes no cache_salt" in record.message for record in caplog.records)


PRIORITY_PATHS = [
    ("/v1/completions", {"model": "base", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "chat", "messages": MESSAGES}),
    ("/v1/chat/completions/batch", {"model": "chat", "messages": [MESSAGES]}),
    ("/v1/responses", {"model": "chat", "input": "Hi"}),
    ("/complete", {"prompt": "x"}),
    ("/chat", {"messages": MESSAGES}),
]


@pytest.mark.parametrize(("path", "body"), PRIORITY_PATHS)
async def test_a_client_cannot_set_its_priority(
    keyed_gateway: tuple[httpx.AsyncClient, Tenancy], script: Script, path: str, body: dict[str, Any]
) -> None:
    http, _ = keyed_gateway
    response = await post(http, path, {**body, "priority": -10}, "alpha")
    assert response.status_code == 400 and response.json()["error"]["param"] == "priority"
    assert script.bodies == []
    if path.startswith("/v1/"):  # 0 is vLLM's default: it asks for nothing
        assert (await post(http, path, {**body, "priority": 0}, "alpha")).status_code == 200


@pytest.mark.parametrize(("field", "value"), [("previous_response_id", "resp_123"), ("background", True)])
async def test_responses_that_need_storage_are_refused(
    standin_url: str, script: Script, field: str, value: Any
) -> None:
    script.schema = SCHEMA
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        response = await http.post("/v1/responses", json={"model": "chat", "input": "Hi", field: value})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field and "per API key" in error["message"]
    assert script.bodies == []


def recording(app: Any, seen: list[tuple[str, str | None]]) -> Any:
    """The stand-in, noting each request's path and Authorization header."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization")
            seen.append((scope["path"], header.decode() if header else None))
        await app(scope, receive, send)

    return wrapped


@pytest.mark.parametrize("worker_key", [None, "worker-secret"])
async def test_the_workers_key_goes_with_every_request_and_probe(worker_key: str | None) -> None:
    seen: list[tuple[str, str | None]] = []
    script = Script(schema=SCHEMA)
    async with serve_in_background(recording(build_app(script), seen)) as url:
        settings = standin_settings(url, api_keys="alpha", worker_api_key=worker_key)
        async with running_gateway(settings) as (_, http):
            body = {"model": "base", "prompt": "x"}
            assert (await http.post("/v1/completions", json=body, headers=auth("alpha"))).status_code == 200
            assert (
                await post(http, "/chat", {"messages": MESSAGES, "stream": True}, "alpha")
            ).status_code == 200
    paths = {path for path, _ in seen}
    assert {"/health", "/v1/models", "/openapi.json", "/v1/completions"} <= paths
    expected = f"Bearer {worker_key}" if worker_key else None
    assert {header for _, header in seen} == {expected}  # never the client's own key


CHAT_PATHS = [
    ("/chat", {"messages": MESSAGES, "max_tokens": 1}),
    ("/chat/render", {"messages": MESSAGES}),
    ("/v1/chat/completions", {"model": "chat", "messages": MESSAGES}),
    ("/v1/chat/completions/batch", {"model": "chat", "messages": [MESSAGES]}),
    ("/tokenize", {"model": "chat", "messages": MESSAGES}),
    ("/v1/responses", {"model": "chat", "input": "Hi"}),
]


@pytest.mark.parametrize(("path", "body"), CHAT_PATHS, ids=[p for p, _ in CHAT_PATHS])
async def test_the_render_checks_cache_is_kept_apart_per_cache_group(
    standin_url: str, script: Script, path: str, body: dict[str, Any]
) -> None:
    """A cached placeholder render answers faster: keys of different cache groups never share one
    (alpha and gamma share a group on purpose), on every chat path."""
    script.schema = {**SCHEMA, "BatchChatCompletionRequest": [*COMMON, "messages"]}
    async with running_gateway(keyed(standin_url)) as (app, http):
        cache = app.state.gateway.tokenizers["chat"]._chat._sequences
        for key in ("alpha", "gamma", "beta", "beta"):
            response = await http.post(path, json=body, headers=auth(key))
            assert response.status_code == 200, response.text
        assert len(cache) == 2  # team (alpha, gamma) and beta's own
