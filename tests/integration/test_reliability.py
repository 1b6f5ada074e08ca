"""Backpressure, failover, timeouts, cancellation, limits, auth and drain, each driven by a
fault-injecting stand-in, asserting the status, the envelope and that nothing leaked."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.workers.supervisor import free_port
from tests.helpers import eventually, outstanding, sse_payloads
from tests.integration.conftest import extra_standin, first_replica_first, running_gateway, standin_settings
from tests.integration.standin import Script

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}


def envelope(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


async def test_over_capacity_is_a_503_with_retry_after_before_anything_goes_upstream(
    standin_url: str, script: Script
) -> None:
    script.tokens = ["t"] * 40
    script.token_delay = 0.02
    settings = standin_settings(
        standin_url, max_in_flight_per_worker=1, max_queue_per_model=1, queue_timeout=5
    )
    async with running_gateway(settings) as (app, http):
        stream = {"model": "base", "prompt": "x", "stream": True}
        holder = asyncio.ensure_future(http.post("/complete", json=stream))
        await eventually(lambda: script.bodies)
        queued = asyncio.ensure_future(http.post("/complete", json={"model": "base", "prompt": "y"}))
        await eventually(lambda: app.state.gateway.pools["base"].queued)
        refused = await http.post("/complete", json={"model": "base", "prompt": "z"})
        error = envelope(refused, 503)
        assert refused.headers["retry-after"] == "1"
        assert error["code"] == "overloaded"
        assert len(script.bodies) == 1  # neither the queued nor the refused one went upstream yet
        assert (await holder).status_code == 200
        assert (await queued).status_code == 200  # served once the slot was free
        assert len(script.bodies) == 2
        assert outstanding(app.state.gateway) == 0


async def test_queue_wait_timeout_is_a_503(standin_url: str, script: Script) -> None:
    script.first_token_delay = 1.0
    settings = standin_settings(standin_url, max_in_flight_per_worker=1, queue_timeout=0.1)
    async with running_gateway(settings) as (app, http):
        holder = asyncio.ensure_future(http.post("/complete", json={"model": "base", "prompt": "x"}))
        await eventually(lambda: script.bodies)
        timed_out = await http.post("/complete", json={"model": "base", "prompt": "y"})
        assert "within 0.1 s" in str(envelope(timed_out, 503)["message"])
        assert (await holder).status_code == 200
        assert outstanding(app.state.gateway) == 0


@pytest.mark.parametrize("fault", ["fail", "refused"])
async def test_a_failing_worker_is_retried_once_on_another_replica(
    standin_url: str, script: Script, fault: str
) -> None:
    async with extra_standin() as (other, other_url):
        dead_url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        first_url = dead_url if fault == "refused" else other_url
        other.mode = "fail"
        async with running_gateway(standin_settings(first_url, standin_url, health_interval=60)) as (
            app,
            http,
        ):
            pool = app.state.gateway.pools["chat"]
            with first_replica_first(pool):  # the failing one
                response = await http.post("/chat", json=CHAT)
            assert response.status_code == 200, response.text
            assert len(script.bodies) == 1  # the healthy replica served it
            if fault == "fail":
                assert len(other.bodies) == 1  # tried first, answered 500
            else:
                assert not pool.workers[0].healthy  # ejected at once
            assert outstanding(app.state.gateway) == 0


async def test_upstream_4xx_is_not_retried(standin_url: str, script: Script) -> None:
    async with extra_standin() as (other, other_url):
        other.mode = script.mode = "reject"
        async with running_gateway(standin_settings(standin_url, other_url)) as (_, http):
            response = await http.post("/chat", json=CHAT)
            assert response.status_code == 400
            assert len(script.bodies) + len(other.bodies) == 1


async def test_no_healthy_worker_is_a_503_with_a_clear_message(standin_url: str, script: Script) -> None:
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        script.healthy = False
        for _ in range(100):
            if (await http.get("/ready")).status_code == 503:
                break
            await asyncio.sleep(0.02)
        error = envelope(await http.post("/chat", json=CHAT), 503)
        assert "No healthy worker for model 'chat'" in str(error["message"])


async def test_first_token_timeout_ends_the_stream_cleanly(standin_url: str, script: Script) -> None:
    script.first_token_delay = 1.0
    async with running_gateway(standin_settings(standin_url, first_token_timeout=0.1)) as (app, http):
        async with http.stream("POST", "/chat", json={**CHAT, "stream": True}) as response:
            payloads = await sse_payloads(response)
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["error"]["type"] == "timeout"
        assert "first token within 0.1 s" in json.loads(payloads[-2])["error"]["message"]
        assert outstanding(app.state.gateway) == 0


async def test_idle_timeout_between_tokens(standin_url: str, script: Script) -> None:
    script.token_delay = 1.0
    async with running_gateway(standin_settings(standin_url, idle_token_timeout=0.1)) as (_, http):
        async with http.stream("POST", "/chat", json={**CHAT, "stream": True}) as response:
            payloads = await sse_payloads(response)
        assert json.loads(payloads[0])["delta"] == "Hello"
        assert "next token within 0.1 s" in json.loads(payloads[-2])["error"]["message"]


async def test_non_streamed_timeout_is_a_504(standin_url: str, script: Script) -> None:
    script.first_token_delay = 1.0
    async with running_gateway(standin_settings(standin_url, read_timeout=0.1)) as (app, http):
        error = envelope(await http.post("/chat", json=CHAT), 504)
        assert error["type"] == "timeout"
        assert outstanding(app.state.gateway) == 0


async def test_a_client_leaving_a_non_streamed_request_aborts_it_upstream(
    standin_url: str, script: Script
) -> None:
    script.first_token_delay = 5.0
    async with running_gateway(standin_settings(standin_url)) as (app, http):
        request = asyncio.ensure_future(http.post("/chat", json=CHAT))
        await eventually(lambda: script.bodies)
        request.cancel()  # the client goes away
        await asyncio.gather(request, return_exceptions=True)
        await eventually(lambda: script.aborted_answers and not outstanding(app.state.gateway))
        assert script.aborted_answers == 1
        assert outstanding(app.state.gateway) == 0
        metrics = (await http.get("/metrics")).text
        assert 'gateway_client_disconnects_total{endpoint="chat",model="chat"} 1.0' in metrics


async def test_body_size_limit_before_parsing(standin_url: str, script: Script) -> None:
    async with running_gateway(standin_settings(standin_url, max_body_bytes=2048)) as (_, http):
        big = {"model": "base", "prompt": "x" * 4096}
        assert envelope(await http.post("/complete", json=big), 413)["code"] == "request_too_large"

        async def chunked() -> object:
            yield b'{"model": "base", "prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        response = await http.post(
            "/complete", content=chunked(), headers={"content-type": "application/json"}
        )
        assert envelope(response, 413)["code"] == "request_too_large"
        assert script.bodies == []
        assert (await http.post("/complete", json={"model": "base", "prompt": "small"})).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/complete", {"prompt": "x", "n": 3}, "n"),
        ("/complete", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
        ("/complete", {"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 65}, "max_completion_tokens"),
        ("/v1/completions", {"model": "base", "prompt": "x", "logprobs": 3}, "logprobs"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 3}, "top_logprobs"),
        ("/chat", {"messages": [{"role": "user", "content": "x"}] * 4}, "messages"),
        ("/complete", {"prompt": "x" * 101}, "prompt"),
        ("/chat", {"messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
    ],
)
async def test_configured_caps(
    standin_url: str, script: Script, path: str, body: dict[str, object], param: str
) -> None:
    caps = {"max_n": 2, "max_stop": 2, "max_tokens_limit": 64, "max_logprobs": 2, "max_messages": 3,
            "max_prompt_chars": 100}  # fmt: skip
    async with running_gateway(standin_settings(standin_url, **caps)) as (_, http):
        error = envelope(await http.post(path, json=body), 400)
        assert error["param"] == param
        assert script.bodies == []


async def test_api_keys_rate_limit_and_open_paths(standin_url: str) -> None:
    settings = standin_settings(standin_url, api_keys="key-one, key-two", rate_limit="3/minute")
    async with running_gateway(settings) as (_, http):
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code == 200
        missing = await http.post("/complete", json={"prompt": "x"})
        assert envelope(missing, 401)["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await http.post(
            "/complete", json={"prompt": "x"}, headers={"Authorization": "Bearer key-three"}
        )
        envelope(wrong, 401)
        assert (await http.get("/v1/models")).status_code == 401
        good = {"Authorization": "Bearer key-two"}
        for _ in range(3):
            assert (await http.post("/complete", json={"prompt": "x"}, headers=good)).status_code == 200
        limited = await http.post("/complete", json={"prompt": "x"}, headers=good)
        assert envelope(limited, 429)["type"] == "rate_limit_error"
        assert int(limited.headers["retry-after"]) >= 1
        other = {"Authorization": "Bearer key-one"}
        assert (await http.post("/complete", json={"prompt": "x"}, headers=other)).status_code == 200


async def test_metrics_need_a_key_by_default_once_keys_are_set(standin_url: str) -> None:
    settings = standin_settings(standin_url, api_keys="k")
    async with running_gateway(settings) as (_, http):
        assert envelope(await http.get("/metrics"), 401)["code"] == "invalid_api_key"
        scraped = await http.get("/metrics", headers={"Authorization": "Bearer k"})
        assert scraped.status_code == 200
        assert f'worker="{standin_url.removeprefix("http://")}"' in scraped.text  # the key holder sees where


async def test_public_metrics_never_show_worker_addresses_while_keys_are_set(standin_url: str) -> None:
    settings = standin_settings(standin_url, api_keys="k", metrics_require_key=False)
    async with running_gateway(settings) as (_, http):
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200
        address = standin_url.removeprefix("http://")
        assert address not in scraped.text and address.split(":")[0] not in scraped.text
        assert 'gateway_worker_up{model="base",worker="base-0"} 1.0' in scraped.text


async def test_without_keys_metrics_are_open_and_name_workers(standin_url: str) -> None:
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200
        assert standin_url.removeprefix("http://") in scraped.text


async def test_cors_only_with_an_allow_list(standin_url: str) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        response = await http.options("/complete", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    async with running_gateway(standin_settings(standin_url, cors_allow_origins="https://app.example")) as (
        _,
        http,
    ):
        response = await http.options("/complete", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"


async def test_drain_refuses_new_work_and_ends_streams_cleanly(standin_url: str, script: Script) -> None:
    script.tokens = ["t"] * 1000
    script.token_delay = 0.02
    settings = standin_settings(standin_url, drain_timeout=0.3, drain_accept_window=0)
    async with running_gateway(settings) as (app, http):
        async with http.stream("POST", "/chat", json={**CHAT, "stream": True}) as response:
            drain = asyncio.ensure_future(app.state.drain.run())
            await asyncio.sleep(0.05)
            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = await http.post("/chat", json=CHAT)
            assert envelope(refused, 503)["code"] == "shutting_down"
            payloads = await sse_payloads(response)
        await drain
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["error"]["code"] == "shutting_down"
        assert outstanding(app.state.gateway) == 0
        await eventually(lambda: script.open_streams == 0)  # the worker saw its stream closed


async def test_after_sigterm_new_requests_are_served_during_the_accept_window(
    standin_url: str, script: Script
) -> None:
    """A balancer may still route a few requests here after SIGTERM: /ready says 503 at once, but
    requests keep being served for the accept window; only then are they refused."""
    settings = standin_settings(standin_url, drain_timeout=1.0, drain_accept_window=0.5)
    async with running_gateway(settings) as (app, http):
        drain = asyncio.ensure_future(app.state.drain.run())
        await asyncio.sleep(0.05)
        assert (await http.get("/ready")).status_code == 503
        served = await http.post("/chat", json=CHAT)
        assert served.status_code == 200, served.text
        await asyncio.sleep(0.6)
        assert envelope(await http.post("/chat", json=CHAT), 503)["code"] == "shutting_down"
        await drain
