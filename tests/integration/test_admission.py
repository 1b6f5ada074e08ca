"""Admission: what a request is charged, and that a client who leaves before its answer starts
gives back its place at once, streamed or not."""

from __future__ import annotations

import asyncio
import threading

import httpx

from tests.helpers import eventually, outstanding
from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import Script


async def test_a_batch_takes_a_slot_per_prompt_and_completion(standin_url: str, script: Script) -> None:
    script.first_token_delay = 0.5
    settings = standin_settings(standin_url, max_in_flight_per_worker=8, max_n=4)
    async with running_gateway(settings) as (app, http):
        batch = asyncio.ensure_future(
            http.post("/v1/completions", json={"model": "base", "prompt": ["a", "b", "c"], "n": 2})
        )
        await eventually(lambda: script.bodies)
        assert outstanding(app.state.gateway) == 6  # 3 prompts x n=2
        other = asyncio.ensure_future(
            http.post("/v1/completions", json={"model": "base", "prompt": "x", "n": 3})
        )
        await eventually(lambda: app.state.gateway.pools["base"].queued == 1)  # 6 + 3 > 8: it waits
        assert (await batch).status_code == 200
        assert (await other).status_code == 200
        assert script.most_in_flight == 1  # never both at once
        assert outstanding(app.state.gateway) == 0


async def test_batched_prompts_are_tokenized_off_the_event_loop(
    standin_url: str, script: Script, monkeypatch: object
) -> None:
    async with running_gateway(standin_settings(standin_url)) as (app, http):
        tokenizer = app.state.gateway.tokenizers["base"]
        threads: list[str] = []
        original = tokenizer.encode_for_worker

        def spy(texts: list[str], add_special_tokens: bool = True) -> list[tuple[list[int], bool]]:
            threads.append(threading.current_thread().name)
            return original(texts, add_special_tokens)

        tokenizer.encode_for_worker = spy
        # echo with logprobs: the scoring budget needs their tokens (other prompts go untokenized)
        batch = {"model": "base", "prompt": ["a b", "c d"] * 50, "echo": True, "logprobs": 0}
        response = await http.post("/v1/completions", json=batch)
        assert response.status_code == 200, response.text
        assert threads and threading.main_thread().name not in threads
        assert len(script.bodies[0]["prompt"]) == 100


async def test_a_streamed_request_whose_client_leaves_while_queued_is_never_sent(
    standin_url: str, script: Script
) -> None:
    script.tokens = ["t"] * 40
    script.token_delay = 0.02
    settings = standin_settings(standin_url, max_in_flight_per_worker=1, queue_timeout=10)
    async with running_gateway(settings) as (app, http):
        holder = asyncio.ensure_future(
            http.post("/complete", json={"model": "base", "prompt": "x", "stream": True})
        )
        await eventually(lambda: script.bodies)
        pool = app.state.gateway.pools["base"]
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=10) as leaving:
            queued = asyncio.ensure_future(
                leaving.post("/complete", json={"model": "base", "prompt": "queued", "stream": True})
            )
            await eventually(lambda: pool.queued == 1)
            queued.cancel()  # the client goes away while waiting in line
            await asyncio.gather(queued, return_exceptions=True)
        await eventually(lambda: pool.queued == 0, seconds=2)  # its place is given back at once
        assert (await holder).status_code == 200
        await asyncio.sleep(0.2)
        assert [body["prompt"] for body in script.bodies] == [script.bodies[0]["prompt"]]  # never sent
        assert outstanding(app.state.gateway) == 0
        metrics = (await http.get("/metrics")).text
        assert 'gateway_client_disconnects_total{endpoint="complete",model="base"} 1.0' in metrics


async def test_the_health_monitor_survives_an_unexpected_answer(standin_url: str, script: Script) -> None:
    script.models_answer = {"data": None}  # /v1/models answers, but not with a list
    async with running_gateway(standin_settings(standin_url)) as (app, http):
        await asyncio.sleep(0.3)  # a few rounds of probes against the odd answer
        worker = app.state.gateway.pools["base"].workers[0]
        assert worker.healthy  # a fact it cannot use is no verdict on the worker...
        request = {"model": "base", "prompt": "x", "max_tokens": 2}
        assert (await http.post("/complete", json=request)).status_code == 503  # ...context unknown yet
        script.models_answer = None
        await eventually(lambda: worker.max_model_len == 2048, seconds=5)  # read again at a later check
        assert (await http.post("/complete", json=request)).status_code == 200
        script.healthy = False
        await eventually(lambda: not worker.healthy, seconds=5)  # and monitoring went on
        assert (await http.get("/ready")).status_code == 503
