"""Health checks of the real gateway app against the stand-in: a busy worker (its probes unanswered
while its requests complete) stays in; a stall of the gateway's own loop fails no worker; what a
worker says about itself is read again when it fails to say it, and when the worker comes back."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.helpers import eventually, stream_payloads
from tests.integration.conftest import running_gateway, serve_in_thread, standin_settings
from tests.integration.standin import Script, build_app

OLD_SCHEMA = {"CompletionRequest": ["model", "prompt", "max_tokens", "stream", "stream_options"]}
NEW_SCHEMA = {"CompletionRequest": [*OLD_SCHEMA["CompletionRequest"], "field_from_the_future"]}


async def test_a_worker_busy_with_requests_stays_in_while_its_probes_time_out(
    standin_url: str, script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    script.health_hangs_while_busy = True  # /health waits behind the requests
    script.token_delay = 0.3
    settings = standin_settings(standin_url, health_timeout=0.2)
    async with running_gateway(settings) as (app, http):
        worker = app.state.gateway.pools["base"].workers[0]
        seen_down = False

        async def watch() -> None:
            nonlocal seen_down
            while True:
                seen_down = seen_down or not worker.healthy
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        payloads = await stream_payloads(http, "/v1/completions", {"model": "base", "prompt": "x"})
        watcher.cancel()
        assert payloads[-1] == "[DONE]"
        assert not seen_down and worker.failed_checks == 0
        assert "answered no probe within 0.2 s but is busy" in caplog.text  # the probes did time out


async def test_a_stall_of_the_gateway_fails_no_worker(caplog: pytest.LogCaptureFixture) -> None:
    # The worker runs in a thread of its own: it answers while the gateway's loop is blocked.
    worker_script = Script(health_delay=0.2)
    with serve_in_thread(build_app(worker_script)) as url:
        settings = standin_settings(url, health_timeout=0.3)
        async with running_gateway(settings) as (app, http):
            for _ in range(3):
                await eventually(lambda: worker_script.health_pending > 0)  # a probe is out...
                time.sleep(1.0)  # noqa: ASYNC251 (...and the gateway's loop blocks, as by a costly request)
                await asyncio.sleep(0.3)
            assert "failed its health check" not in caplog.text
            assert all(pool.workers[0].healthy for pool in app.state.gateway.pools.values())
            assert (await http.post("/complete", json={"model": "base", "prompt": "x"})).status_code == 200


async def test_a_schema_that_failed_to_load_is_learned_later(standin_url: str, script: Script) -> None:
    script.schema = OLD_SCHEMA
    script.schema_failures = 4  # a transient 500 on /openapi.json, for both models' first reads
    async with running_gateway(standin_settings(standin_url)) as (app, http):
        pool = app.state.gateway.pools["base"]
        await eventually(lambda: pool.fact("fields"), seconds=5)  # field checking is not off for good
        refused = await http.post("/v1/completions", json={"model": "base", "prompt": "x", "top_k": 5})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"


async def test_a_worker_that_comes_back_changed_is_learned_again(standin_url: str, script: Script) -> None:
    script.schema = OLD_SCHEMA
    async with running_gateway(standin_settings(standin_url)) as (app, http):
        future = {"model": "base", "prompt": "x", "field_from_the_future": 1}
        long = {"model": "base", "prompt": "x", "max_tokens": 1500}  # /complete: the gateway checks it
        assert (await http.post("/v1/completions", json=future)).status_code == 400
        assert (await http.post("/complete", json=long)).status_code == 200
        worker = app.state.gateway.pools["base"].workers[0]
        script.healthy = False  # redeployed behind the same address: down a while...
        await eventually(lambda: not worker.healthy, seconds=5)
        script.schema, script.max_model_len = NEW_SCHEMA, 1024
        script.healthy = True  # ...and back, a newer version with a smaller context
        await eventually(lambda: worker.healthy, seconds=5)
        assert (await http.post("/v1/completions", json=future)).status_code == 200
        refused = await http.post("/complete", json=long)
        assert refused.status_code == 400 and "context of 1024 tokens" in refused.json()["error"]["message"]
        models = (await http.get("/v1/models")).json()["data"]
        assert next(m for m in models if m["id"] == "base")["max_model_len"] == 1024
