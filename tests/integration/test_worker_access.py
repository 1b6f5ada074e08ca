"""Who may use a worker, and what the gateway says when it cannot: the real app in front of stand-in
workers.

- An embedded worker (a stand-in engine that loads `--middleware` as vLLM's server does) is launched
  with the workers' guard when a workers' key is set: the gateway serves and probes through it, a
  request without the key is refused on every path but /health.
- A worker that refuses the gateway's key is the gateway's configuration problem: clients get a 502
  saying so (never the worker's 401), the worker is down, and /ready says why.
- `/ready?any` stays 200 while some model can be served; `/ready` names every model.
- With admin keys, /metrics (every tenant's counts) takes an admin key, never a client's.
- With API keys, `/v1/models` does not show host folders as `root`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.app import create_app
from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.worker_guard import WorkerGuard
from tests.helpers import eventually
from tests.integration.conftest import (
    TOKENIZER,
    running_gateway,
    serve_in_background,
    standin_settings,
)
from tests.integration.standin import Script, build_app

STANDIN = Path(__file__).with_name("standin.py")
WORKER_KEY = "the-workers-own-key"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "base", "prompt": "Hi", "max_tokens": 2}


def guarded(script: Script, key: str = WORKER_KEY) -> ASGIApp:
    """A stand-in worker behind the workers' guard, as `--middleware` puts it in front of vLLM."""
    return WorkerGuard(build_app(script), key)


def vllm_key_only(script: Script, key: str = WORKER_KEY) -> ASGIApp:
    """A stand-in worker guarded as vLLM's own --api-key guards: /v1 only (/health, /metrics open)."""
    app = build_app(script)

    async def guard(scope: Scope, receive: Receive, send: Send) -> None:
        keyed = dict(scope.get("headers", [])).get(b"authorization") == f"Bearer {key}".encode()
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not keyed:
            refusal = JSONResponse({"error": "Unauthorized"}, status_code=401)  # vLLM's own words
            await refusal(scope, receive, send)
            return
        await app(scope, receive, send)

    return guard


@pytest.fixture
async def wrong_key_worker() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    async with serve_in_background(guarded(script)) as url:
        yield script, url


@pytest.mark.parametrize("worker", [guarded, vllm_key_only], ids=["guard", "vllm-api-key"])
async def test_a_worker_refusing_the_gateways_key_is_a_502_and_red_ready(worker: object) -> None:
    script = Script()
    async with serve_in_background(worker(script)) as url:  # type: ignore[operator]
        settings = standin_settings(url, worker_api_key="not-the-workers-key")
        async with running_gateway(settings) as (_, http):
            ready = await http.get("/ready")
            assert ready.status_code == 503, ready.text
            detail = ready.json()["detail"]
            assert set(detail) == {"base", "chat"}
            [down] = detail["chat"]
            assert "refused the gateway's worker key (HTTP 401)" in down["reason"]
            assert "GATEWAY_WORKER_API_KEY" in down["reason"]
            routes = [("/v1/chat/completions", CHAT), ("/chat", CHAT), ("/v1/completions", COMPLETION),
                      ("/v1/chat/completions", {**CHAT, "stream": True})]  # fmt: skip
            for path, body in routes:
                answer = await http.post(path, json=body)
                assert answer.status_code == 502, (path, answer.text)  # not the worker's 401
                error = answer.json()["error"]
                assert error["code"] == "worker_auth_failed" and error["type"] == "upstream_error"
                assert "could not authenticate to the workers of model" in error["message"]
            assert script.bodies == []  # nothing reached the worker's handlers


async def test_a_key_refused_while_healthy_ejects_the_worker_at_the_first_request() -> None:
    """The facts were read with the right key; then the worker's key changes (a rotated Secret): the
    first request hears a 502 naming the cause, and the worker is out at once."""
    script = Script()
    key = ["right"]

    async def worker(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await WorkerGuard(build_app(script), key[0])(scope, receive, send)

    async with serve_in_background(worker) as url:
        settings = standin_settings(url, worker_api_key="right", health_interval=30)
        async with running_gateway(settings) as (app, http):
            assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200
            key[0] = "rotated"
            answer = await http.post("/v1/completions", json=COMPLETION)
            assert answer.status_code == 502 and answer.json()["error"]["code"] == "worker_auth_failed"
            assert (
                "could not authenticate to the worker for model 'base'" in answer.json()["error"]["message"]
            )
            [worker_state] = app.state.gateway.pools["base"].workers
            assert not worker_state.healthy and worker_state.refused_status == 401
            again = await http.post("/v1/completions", json=COMPLETION)  # no worker left: still the cause
            assert again.status_code == 502 and "workers of model 'base'" in again.json()["error"]["message"]


async def test_ready_any_stays_green_while_some_model_is_served() -> None:
    healthy, sick = Script(), Script(healthy=False)
    async with serve_in_background(build_app(healthy)) as good, serve_in_background(build_app(sick)) as bad:
        settings = Settings(
            models=[
                ModelSpec(name="base", kind=ModelKind.BASE, tokenizer=TOKENIZER, urls=[bad]),  # type: ignore[list-item]
                ModelSpec(name="chat", kind=ModelKind.INSTRUCT, tokenizer=TOKENIZER, urls=[good]),  # type: ignore[list-item]
            ],
            health_interval=0.1,
        )
        async with running_gateway(settings) as (app, http):
            await eventually(lambda: app.state.gateway.pools["chat"].ready)
            every = await http.get("/ready")
            assert every.status_code == 503 and every.json()["not_ready"] == ["base"]
            assert every.json()["detail"]["base"][0]["reason"] == "it answered /health with an error"
            some = await http.get("/ready?any")
            assert some.status_code == 200 and some.json()["status"] == "ready"
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            healthy.healthy = False  # now no model can be served
            await eventually(lambda: not app.state.gateway.pools["chat"].ready)
            assert (await http.get("/ready?any")).status_code == 503
            healthy.healthy = True
            await eventually(lambda: app.state.gateway.pools["chat"].ready)
            app.state.drain.stopping = True  # draining: out, whatever is served
            try:
                assert (await http.get("/ready?any")).json()["status"] == "draining"
            finally:
                app.state.drain.stopping = False


async def test_ready_hides_worker_addresses_while_keys_are_set(wrong_key_worker: tuple[Script, str]) -> None:
    _, url = wrong_key_worker
    address = url.removeprefix("http://")
    async with running_gateway(standin_settings(url, api_keys="k", worker_api_key="wrong")) as (_, http):
        ready = (await http.get("/ready")).text
        assert address not in ready and address.split(":")[0] not in ready and "base-0" in ready


async def test_with_admin_keys_metrics_are_the_operators(standin_url: str) -> None:
    settings = standin_settings(standin_url, api_keys="tenant-a,tenant-b", admin_keys="operator")
    async with running_gateway(settings) as (_, http):
        for key in ("tenant-a", "tenant-b", "wrong"):
            refused = await http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert refused.status_code == 401, key
        assert (await http.get("/metrics")).status_code == 401
        scraped = await http.get("/metrics", headers={"Authorization": "Bearer operator"})
        assert scraped.status_code == 200 and "gateway_requests_total" in scraped.text
        assert standin_url.removeprefix("http://") in scraped.text  # the operator sees where workers are
        tenant = {"Authorization": "Bearer tenant-a"}
        assert (await http.post("/v1/completions", json=COMPLETION, headers=tenant)).status_code == 200
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer operator"})).status_code == 401


async def test_metrics_can_still_be_made_public_without_addresses(standin_url: str) -> None:
    settings = standin_settings(standin_url, api_keys="t", admin_keys="operator", metrics_require_key=False)
    async with running_gateway(settings) as (_, http):
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200 and standin_url.removeprefix("http://") not in scraped.text


async def test_model_roots_that_are_host_folders_are_hidden_from_tenants(
    standin_url: str, script: Script
) -> None:
    script.models_answer = {
        "object": "list",
        "data": [{"id": "any", "root": "/root/.cache/m", "parent": None}],
    }
    keys = {"Authorization": "Bearer t"}
    async with running_gateway(standin_settings(standin_url, api_keys="t")) as (_, http):
        listing = (await http.get("/v1/models", headers=keys)).json()["data"]
        assert [entry["root"] for entry in listing] == ["base", "chat"]
        assert (await http.get("/v1/models/chat", headers=keys)).json()["root"] == "chat"
    async with running_gateway(standin_settings(standin_url)) as (_, http):  # no keys: vLLM's own entry
        assert {entry["root"] for entry in (await http.get("/v1/models")).json()["data"]} == {
            "/root/.cache/m"
        }
    script.models_answer = {"object": "list", "data": [{"id": "any", "root": "org/model-7b", "parent": None}]}
    async with running_gateway(standin_settings(standin_url, api_keys="t")) as (_, http):
        assert {entry["root"] for entry in (await http.get("/v1/models", headers=keys)).json()["data"]} == {
            "org/model-7b"
        }  # a hub id says nothing of the host


def fake_engine_settings(tmp_path: Path) -> Settings:
    """One embedded worker: the stand-in as a fake engine (it loads `--middleware` as vLLM does)."""
    engine = tmp_path / "fake-python"
    engine.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {STANDIN} "$@"\n')
    engine.chmod(0o755)
    tokenizer = Settings().resolve_source(TOKENIZER)
    spec = ModelSpec(name="fake", kind=ModelKind.BASE, source=str(tmp_path), tokenizer=tokenizer)
    return Settings(
        models=[spec], engine_python=str(engine), cache_dir=tmp_path, health_interval=0.1,
        worker_api_key=WORKER_KEY,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_an_embedded_worker_with_a_key_is_closed_to_all_but_its_gateway(tmp_path: Path) -> None:
    app = create_app(fake_engine_settings(tmp_path))
    async with serve_in_background(app) as url, httpx.AsyncClient(timeout=10) as http:
        supervised = app.state.processes[0]
        await eventually(lambda: supervised.worker.healthy, seconds=30)
        worker = supervised.worker.url
        engine = psutil.Process(supervised.process.pid)
        key = engine.environ()["VLLM_API_KEY"]
        assert key == WORKER_KEY
        assert key not in " ".join(engine.cmdline())
        # The gateway serves, and probes, through the guard.
        answer = await http.post(
            f"{url}/v1/completions", json={"model": "fake", "prompt": "Hi", "max_tokens": 2}
        )
        assert answer.status_code == 200, answer.text
        assert (await http.get(f"{url}/ready")).status_code == 200
        # Anyone else: refused on every path the worker serves, /health apart.
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
            assert (await http.post(f"{worker}{path}", json={"prompt": "x"})).status_code == 401
        for path in ("/v1/models", "/openapi.json", "/metrics", "/invocations"):
            assert (await http.get(f"{worker}{path}")).status_code == 401
        assert (await http.get(f"{worker}/health")).status_code == 200
        keyed = await http.get(f"{worker}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert keyed.status_code == 200
        await asyncio.sleep(0)


async def test_ready_hides_worker_addresses_once_runtime_keys_guard_the_gateway(
    wrong_key_worker: tuple[Script, str], tmp_path: Path
) -> None:
    _, url = wrong_key_worker
    address = url.removeprefix("http://")
    settings = standin_settings(url, admin_keys="operator", worker_api_key="wrong",
                                database_url=f"sqlite:///{tmp_path / 'gateway.db'}")  # fmt: skip
    async with running_gateway(settings) as (_, http):
        assert address in (await http.get("/ready")).text  # no client key yet: the gateway is open
        created = await http.post("/keys", json={"name": "app"}, headers={"Authorization": "Bearer operator"})
        assert created.status_code == 201, created.text
        ready = (await http.get("/ready")).text
        assert address not in ready and address.split(":")[0] not in ready and "base-0" in ready
