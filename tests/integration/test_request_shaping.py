"""What the gateway sends to a worker and how it shapes the answer, read off the stand-in."""

from __future__ import annotations

import json

import httpx

from tests.integration.standin import Script

MESSAGES = [{"role": "user", "content": "Hi"}]


async def test_chat_sends_rendered_token_ids_with_fitted_max_tokens(
    http: httpx.AsyncClient, script: Script
) -> None:
    rendered = (await http.post("/chat/render", json={"messages": MESSAGES})).json()
    response = await http.post(
        "/chat", json={"messages": MESSAGES, "temperature": 0.5, "top_k": 5, "seed": 1}
    )
    assert response.status_code == 200, response.text
    sent = script.bodies[-1]
    assert sent["prompt"] == rendered["token_ids"]
    assert sent["model"] == "chat"
    assert sent["max_tokens"] == 100  # omitted: capped by default_max_tokens
    assert {k: sent[k] for k in ("temperature", "top_k", "seed")} == {
        "temperature": 0.5,
        "top_k": 5,
        "seed": 1,
    }
    assert "messages" not in sent
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert body["id"] == "cmpl-standin"


async def test_few_shot_prompt_layout_and_default_stops(http: httpx.AsyncClient, script: Script) -> None:
    examples = [{"input": "cat", "output": "CAT"}, {"input": "dog", "output": "DOG"}]
    await http.post("/complete", json={"prompt": "bird", "examples": examples, "max_tokens": 5})
    sent = script.bodies[-1]
    assert sent["stop"] == ["\n\n", "\nInput:", "\n"]
    layout = {"input_prefix": "Q:", "output_prefix": "A:", "separator": "\n###\n"}
    await http.post(
        "/complete", json={"prompt": "bird", "examples": examples, "layout": layout, "stop": ["!"]}
    )
    assert script.bodies[-1]["stop"] == ["!"]  # the client's own stop wins


async def test_v1_completions_sends_every_prompt_form_as_the_client_wrote_it(
    http: httpx.AsyncClient, script: Script
) -> None:
    """Texts go as texts (the worker tokenizes them the same way, and `echo` returns them as sent),
    token ids as ids."""
    for prompt in ("Hi", ["Hi", "there"], [1, 2, 3], [[1, 2], [3]]):
        body = {"model": "base", "prompt": prompt, "max_tokens": 3}
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, (prompt, response.text)
        assert script.bodies[-1]["prompt"] == prompt


async def test_v1_chat_non_streamed_shape(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "n": 2})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello, world!"] * 2
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert body["system_fingerprint"] == "standin"  # the worker's own fields, all kept


async def test_v1_chat_stream_is_the_workers_own_without_unasked_usage(
    http: httpx.AsyncClient, script: Script
) -> None:
    async with http.stream(
        "POST", "/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "stream": True}
    ) as response:
        payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello, world!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in chunks)  # not asked for
    assert script.paths[-1] == "/v1/chat/completions"  # the worker's own chat endpoint
    assert script.bodies[-1]["messages"] == MESSAGES
    assert script.bodies[-1]["stream_options"] == {"include_usage": True}  # the gateway still counts


async def test_v1_completions_stream_passes_events_through(http: httpx.AsyncClient, script: Script) -> None:
    async with http.stream(
        "POST", "/v1/completions", json={"model": "base", "prompt": "x", "stream": True}
    ) as response:
        payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]] == ["Hello", ",", " world", "!"]
    # The gateway asks for usage to count tokens, but the client did not, so it gets none.
    assert script.bodies[-1]["stream_options"] == {"include_usage": True}


async def test_v1_completions_stream_forwards_usage_when_asked(http: httpx.AsyncClient) -> None:
    request = {"model": "base", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=request) as response:
        payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    last = json.loads(payloads[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4


async def test_models_endpoint_reports_kind_and_learned_context(http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()["data"]
    assert [(m["id"], m["kind"], m["max_model_len"]) for m in models] == [
        ("base", "base", 2048),
        ("chat", "instruct", 2048),
    ]


async def test_openapi_schema_is_served(http: httpx.AsyncClient) -> None:
    schema = (await http.get("/openapi.json")).json()
    assert {"/complete", "/chat", "/chat/render", "/v1/completions", "/v1/chat/completions"} <= set(
        schema["paths"]
    )
