"""Cancelling many in-flight requests on real vLLM workers: vLLM's own gauges return to zero."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, OPERATOR, Stack
from tests.promtext import parse

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.8}


def worker_urls(stack: Stack) -> dict[str, str]:
    return {model: stack.worker_url(model) for model in (BASE_MODEL, INSTRUCT_MODEL)}


def vllm_load(url: str) -> float:
    """Requests running plus waiting, as the vLLM worker itself reports them."""
    samples = parse(httpx.get(f"{url}/metrics", timeout=10).text)
    return sum(
        v
        for (name, _), v in samples.items()
        if name in {"vllm:num_requests_running", "vllm:num_requests_waiting"}
    )


async def _start_and_abandon(url: str, count: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def streamed(i: int) -> None:
            model = BASE_MODEL if i % 2 else INSTRUCT_MODEL
            body = {"model": model, "prompt": f"Story {i}:", "stream": True, **LONG}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        return  # leave after the first token

        async def unstreamed(i: int) -> None:
            await client.post("/complete", json={"prompt": f"Tale {i}:", **LONG})

        waiting = [asyncio.ensure_future(unstreamed(i)) for i in range(count // 2)]
        await asyncio.gather(*(streamed(i) for i in range(count // 2)))
        await asyncio.sleep(1.0)  # the unstreamed ones are being generated now
        for task in waiting:
            task.cancel()  # their clients go away before any answer
        await asyncio.gather(*waiting, return_exceptions=True)


def test_cancelled_requests_are_aborted_in_vllm(stack: Stack, client: httpx.Client) -> None:
    urls = worker_urls(stack)
    asyncio.run(_start_and_abandon(stack.url, 12))
    deadline = time.monotonic() + 30
    while any(vllm_load(url) for url in urls.values()):
        assert time.monotonic() < deadline, {model: vllm_load(url) for model, url in urls.items()}
        time.sleep(0.25)
    samples = parse(client.get("/metrics", headers=OPERATOR).text)
    in_flight = {
        dict(k)["model"]: v for (name, k), v in samples.items() if name == "gateway_requests_in_flight"
    }
    assert set(in_flight.values()) == {0.0}
    fresh = client.post("/complete", json={"prompt": "Hello", "max_tokens": 3})
    assert fresh.status_code == 200
