"""The superset rule through the stand-in: what may pass is what the worker's own schema lists;
requests and answers go through as they are; the gateway's additions sit in front."""

from __future__ import annotations

import json

import httpx
import pytest

from service import __version__
from service.ops.settings import ModelSpec
from tests.integration.conftest import ADMIN_KEY, TOKENIZER, running_gateway, standin_settings
from tests.integration.standin import Script

MESSAGES = [{"role": "user", "content": "Hi"}]
# A worker whose schema knows a field no vLLM has today: the gateway must let it through.
SCHEMA = {
    "CompletionRequest": ["model", "prompt", "max_tokens", "stream", "stream_options", "n", "seed", "echo",
                          "logprobs", "prompt_logprobs", "temperature", "field_from_the_future"],
    "ChatCompletionRequest": ["model", "messages", "max_tokens", "stream", "stream_options", "tools",
                              "tool_choice", "response_format", "seed", "field_from_the_future"],
}  # fmt: skip


async def test_fields_pass_exactly_when_the_workers_schema_has_them(standin_url: str, script: Script) -> None:
    script.schema = SCHEMA
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        new = {"model": "base", "prompt": "x", "field_from_the_future": {"k": [1]}}
        assert (await http.post("/v1/completions", json=new)).status_code == 200
        assert script.bodies[-1]["field_from_the_future"] == {"k": [1]}  # forwarded untouched
        refused = await http.post("/v1/completions", json={"model": "base", "prompt": "x", "top_k": 5})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["param"] == "top_k" and error["code"] == "unknown_field"
        assert "Unrecognized request argument supplied: top_k" in error["message"]
        chat = {"model": "chat", "messages": MESSAGES, "tool_choice": "none", "field_from_the_future": 1}
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
        assert len(script.bodies) == 2  # the refused one never reached the worker


async def test_openai_platform_fields_pass_as_vllm_ignores_them(standin_url: str, script: Script) -> None:
    script.schema = SCHEMA
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        body = {"model": "chat", "messages": MESSAGES, "store": False, "metadata": {"team": "a"}}
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200


async def test_requests_and_answers_go_through_as_they_are(http: httpx.AsyncClient, script: Script) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    tool = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
    body = {"model": "chat", "messages": messages, "seed": -7, "response_format": {"type": "json_object"},
            "tools": [tool]}  # fmt: skip
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert script.bodies[-1] == body  # nothing added, nothing dropped (the model name was given)
    answer = response.json()
    assert answer["system_fingerprint"] == "standin" and answer["choices"][0]["stop_reason"] is None
    assert answer["choices"][0]["message"]["tool_calls"] == []


async def test_what_only_vllm_checks_is_left_to_the_worker(http: httpx.AsyncClient, script: Script) -> None:
    """vLLM refuses these itself, in its own words (tests/e2e compares them with the real worker's): the
    gateway does not refuse them first in other words."""
    for body in ({"model": "base", "prompt": "x", "stream_options": {"include_usage": True}},
                 {"model": "base", "prompt": "x", "seed": 2**63}, {"model": "base", "prompt": ""},
                 {"model": "base", "prompt": [[]]}, {"model": "base", "prompt": "x", "n": 0},
                 {"model": "base", "prompt": "x", "max_tokens": -3},
                 {"model": "chat", "messages": []}):  # fmt: skip
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        response = await http.post(path, json=body)
        assert script.bodies[-1] == body  # it reached the worker as sent
        if body.get("n") == 0:  # the stand-in refuses it as vLLM does: its answer, passed through
            assert response.status_code == 400
            assert response.json()["error"]["message"] == "n must be at least 1, got 0."
        else:  # the stand-in accepts the rest
            assert response.status_code == 200, response.text


async def test_omitted_max_tokens_is_left_to_the_worker(http: httpx.AsyncClient, script: Script) -> None:
    await http.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert "max_tokens" not in script.bodies[-1]  # vLLM's own default applies, as direct


async def test_a_client_stream_options_keep_the_gateways_usage(
    http: httpx.AsyncClient, script: Script
) -> None:
    for options, sent in (
        ({"continuous_usage_stats": False}, {"include_usage": True}),
        # Per-chunk usage without usage: vLLM gives none, so the worker must not be asked for it.
        ({"continuous_usage_stats": True}, {"include_usage": True}),
        ({"include_usage": False, "continuous_usage_stats": True}, {"include_usage": True}),
        ({"include_usage": True, "continuous_usage_stats": True},
         {"include_usage": True, "continuous_usage_stats": True}),
    ):  # fmt: skip
        request = {"model": "base", "prompt": "x", "stream": True, "stream_options": options}
        async with http.stream("POST", "/v1/completions", json=request) as response:
            payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        assert script.bodies[-1]["stream_options"] == sent
        if not options.get("include_usage"):
            assert all("usage" not in json.loads(p) for p in payloads[:-1])  # not asked for: not forwarded
    metrics = (await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text
    assert 'gateway_completion_tokens_total{model="base"}' in metrics


async def test_responses_stream_keeps_its_events_and_ends_without_done(http: httpx.AsyncClient) -> None:
    request = {"model": "chat", "input": "Hi", "stream": True}
    async with http.stream("POST", "/v1/responses", json=request) as response:
        lines = [line async for line in response.aiter_lines() if line]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert events.count("response.output_text.delta") == 4
    assert not any("[DONE]" in line for line in lines)
    answer = (await http.post("/v1/responses", json={"model": "chat", "input": "Hi"})).json()
    assert answer["object"] == "response" and answer["usage"]["output_tokens"] == 4


async def test_responses_are_for_instruct_models(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/responses", json={"model": "base", "input": "Hi"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_chat"


async def test_batch_chat_is_charged_per_conversation(http: httpx.AsyncClient, script: Script) -> None:
    body = {"model": "chat", "messages": [MESSAGES, MESSAGES, MESSAGES]}
    response = await http.post("/v1/chat/completions/batch", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3 and script.paths[-1] == "/v1/chat/completions/batch"


async def test_tokenizer_routes(http: httpx.AsyncClient) -> None:
    tokens = (await http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    assert "".join(tokens["token_strs"]).replace("Ġ", " ") == "Hello world"
    text = (await http.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
    assert text == {"prompt": "Hello world"}
    chat = (await http.post("/tokenize", json={"messages": MESSAGES})).json()
    rendered = (await http.post("/chat/render", json={"messages": MESSAGES})).json()
    assert chat["tokens"] == rendered["token_ids"]
    out_of_vocabulary = await http.post("/detokenize", json={"tokens": [10**9]})
    assert out_of_vocabulary.status_code == 400 and out_of_vocabulary.json()["error"]["param"] == "tokens"
    info = (await http.get("/tokenizer_info")).json()  # the default base model's
    assert info["eos_token"] == "<|im_end|>" and "chat_template" not in info
    assert info["model_max_length"] == 2048  # the worker's context, not the file's "no limit" (1e30)
    assert "chat_template" in (await http.get("/tokenizer_info", params={"model": "chat"})).json()


async def test_models_version_and_one_model(http: httpx.AsyncClient) -> None:
    listing = (await http.get("/v1/models")).json()["data"]
    assert all(entry["root"] == "/standin" and "parent" in entry for entry in listing)
    one = (await http.get("/v1/models/chat")).json()
    assert one["id"] == "chat" and one["kind"] == "instruct"
    missing = await http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert (await http.get("/version")).json() == {"version": None}  # vLLM's shape (the stand-in has none)
    assert (await http.get("/health")).json() == {"status": "ok", "version": __version__}


async def test_scoring_is_bounded_with_the_numbers(standin_url: str, script: Script) -> None:
    async with running_gateway(standin_settings(standin_url, scoring_budget=49_152 * 10)) as (_, http):
        fits = {"model": "base", "prompt": "one two three", "max_tokens": 0, "echo": True, "logprobs": 0}
        assert (await http.post("/v1/completions", json=fits)).status_code == 200
        assert script.bodies[-1]["max_tokens"] == 0
        over = {"model": "base", "prompt": "word " * 40, "prompt_logprobs": 0, "max_tokens": 1}
        refused = await http.post("/v1/completions", json=over)
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "scoring_budget_exceeded"
        assert "491,520" in error["message"] and "at most 10 prompt tokens" in error["message"]
        scored = await http.post("/complete", json={"prompt": "word " * 40, "continuation": " word"})
        assert scored.json()["error"]["code"] == "scoring_budget_exceeded"
        assert len(script.bodies) == 1


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_request_chat_template_needs_a_trusting_model(
    standin_url: str, script: Script, trusted: bool
) -> None:
    settings = standin_settings(standin_url)
    chat = ModelSpec(name="chat", kind="instruct", tokenizer=TOKENIZER, urls=[standin_url],
                     trust_request_chat_template=trusted)  # type: ignore[arg-type]  # fmt: skip
    settings = settings.model_copy(update={"models": [settings.models[0], chat]})
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    async with running_gateway(settings) as (_, http):
        body = {"model": "chat", "messages": MESSAGES, "chat_template": template}
        response = await http.post("/v1/chat/completions", json=body)
    if trusted:
        assert response.status_code == 200 and script.bodies[-1]["chat_template"] == template
    else:  # vLLM's own refusal, word for word (the worker would give it: the gateway must not render it)
        assert response.status_code == 400 and response.json()["error"] == {
            "message": "Chat template is passed with request, but --trust-request-chat-template is not set. "
            "Refused request with untrusted chat template.",
            "type": "BadRequestError", "param": None, "code": 400,
        }  # fmt: skip


async def test_a_v1_body_that_is_not_json_names_where_as_vllm_does(http: httpx.AsyncClient) -> None:
    """vLLM's parser is Python's: its error's `param` is the position of the first bad character."""
    response = await http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    error = response.json()["error"]
    assert response.status_code == 400 and (error["type"], error["code"]) == ("Bad Request", 400)
    assert error["param"] == "body.1" and "'loc': 'body.1'" in error["message"], error


async def test_the_batch_route_asked_to_stream_answers_whole(http: httpx.AsyncClient, script: Script) -> None:
    """vLLM's batch route has no stream (tests/e2e/test_vllm_parity.py shows it answering whole): the
    request reaches the worker as sent and its whole answer comes back."""
    body = {"model": "chat", "messages": [[{"role": "user", "content": "Hi"}]], "stream": True}
    response = await http.post("/v1/chat/completions/batch", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello, world!"
    assert script.bodies[-1] == body
