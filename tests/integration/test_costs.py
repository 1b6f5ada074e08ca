"""What a request may make the gateway or a worker compute, through the real app: prompt logprobs
derived as vLLM derives them and budgeted on every route (summed over a batch), logprob ids counted,
a scored continuation counted with its prompt, detokenize and body structure capped, and the long
answers of the tokenizer routes built off the loop exactly as they were on it."""

from __future__ import annotations

import json

import httpx
import pytest

from service.core.gateway import Gateway
from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import Script

VOCAB = 49_152  # SmolLM2's, the tokenizer both stand-in models use
HI = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "chat", "messages": HI}


async def rendered_length(http: httpx.AsyncClient) -> int:
    return int((await http.post("/tokenize", json={"model": "chat", "messages": HI})).json()["count"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "echo": True}, "echo"),  # vLLM: prompt_logprobs = top_logprobs (0)
        ("/v1/chat/completions", {**CHAT, "prompt_logprobs": 0}, "prompt_logprobs"),
        ("/v1/chat/completions/batch", {"model": "chat", "messages": [HI], "echo": True}, "echo"),
        ("/v1/completions", {"model": "base", "prompt": "word " * 20, "echo": True, "logprobs": 0}, "echo"),
        ("/complete", {"prompt": "word " * 20, "continuation": " word"}, "continuation"),
    ],
)
async def test_prompt_logprobs_are_budgeted_on_every_route_naming_the_field_sent(
    standin_url: str, script: Script, path: str, body: dict[str, object], param: str
) -> None:
    async with running_gateway(standin_settings(standin_url, scoring_budget=VOCAB * 10)) as (_, http):
        response = await http.post(path, json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "scoring_budget_exceeded", response.text
        assert error["param"] == param and "at most 10 prompt tokens" in error["message"]
        assert script.bodies == []  # refused before it reached a worker
        if param == "echo":
            assert "echo" in error["message"]
            fits = await http.post(path, json={**body, "echo": False})
            assert fits.status_code == 200, fits.text


async def test_a_batchs_prompt_logprobs_are_summed_over_its_conversations(
    standin_url: str, script: Script
) -> None:
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        length = await rendered_length(http)
    budget = VOCAB * (length + length // 2)  # one conversation fits, two do not
    async with running_gateway(standin_settings(standin_url, scoring_budget=budget)) as (_, http):
        batch = {"model": "chat", "messages": [HI], "echo": True}
        assert (await http.post("/v1/chat/completions/batch", json=batch)).status_code == 200
        refused = await http.post("/v1/chat/completions/batch", json={**batch, "messages": [HI, HI]})
        assert refused.status_code == 400, refused.text
        assert f"for {2 * length} prompt tokens" in refused.json()["error"]["message"]
        assert len(script.bodies) == 1


WORDS = "word " * 20


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "echo": True}, "echo"),
        ("/v1/chat/completions", {**CHAT, "prompt_logprobs": 0}, "prompt_logprobs"),
        ("/v1/chat/completions/batch", {"model": "chat", "messages": [HI, HI], "echo": True}, "echo"),
        ("/v1/completions", {"model": "base", "prompt": WORDS, "echo": True, "logprobs": 0}, "echo"),
        (
            "/v1/completions",
            {"model": "base", "prompt": [WORDS] * 2, "prompt_logprobs": 0},
            "prompt_logprobs",
        ),
    ],
)
async def test_n_multiplies_the_prompt_logprobs_counted(
    standin_url: str, script: Script, path: str, body: dict[str, object], param: str
) -> None:
    """vLLM fans `n` out into n engine requests, each computing the prompt logprobs (a real worker
    computed 7,344 prompt tokens for 918 with n = 8): n x prompt tokens x vocabulary is budgeted."""
    async with running_gateway(standin_settings(standin_url)) as (_, http):
        if path == "/v1/completions":
            counted = await http.post("/tokenize", json={"model": "base", "prompt": WORDS})
            length = int(counted.json()["count"])
        else:
            length = await rendered_length(http)
    batch = body.get("messages") if "batch" in path else body.get("prompt")
    tokens = (len(batch) if isinstance(batch, list) else 1) * length
    async with running_gateway(standin_settings(standin_url, scoring_budget=VOCAB * tokens * 3)) as (_, http):
        assert (await http.post(path, json={**body, "n": 3})).status_code == 200  # n = 3 fits
        refused = await http.post(path, json={**body, "n": 4})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "scoring_budget_exceeded", refused.text
        assert error["param"] == param and "each of the n = 4 sequences" in error["message"], error
        assert f"{VOCAB * tokens * 4:,} logits" in error["message"]
        assert len(script.bodies) == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "logprobs": True}),
        ("/v1/chat/completions/batch", {"model": "chat", "messages": [HI], "logprobs": True}),
        ("/v1/completions", {"model": "base", "prompt": "x", "logprobs": 1}),
    ],
)
async def test_logprob_token_ids_count_against_the_logprobs_cap(
    http: httpx.AsyncClient, script: Script, path: str, body: dict[str, object]
) -> None:
    response = await http.post(path, json={**body, "logprob_token_ids": list(range(21))})  # cap: 20
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "logprob_token_ids"
    assert (await http.post(path, json={**body, "logprob_token_ids": list(range(20))})).status_code == 200
    assert len(script.bodies) == 1


async def test_a_continuation_counts_in_the_prompt_characters(standin_url: str, script: Script) -> None:
    async with running_gateway(standin_settings(standin_url, max_prompt_chars=100)) as (_, http):
        response = await http.post("/complete", json={"prompt": "x" * 60, "continuation": "y" * 41})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "continuation"
    assert script.bodies == []


async def test_detokenize_takes_at_most_the_configured_ids(standin_url: str) -> None:
    async with running_gateway(standin_settings(standin_url, max_detokenize_tokens=100)) as (_, http):
        assert (await http.post("/detokenize", json={"tokens": [42] * 100})).status_code == 200
        refused = await http.post("/detokenize", json={"tokens": [42] * 101})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens"


async def test_a_body_of_too_many_arrays_is_refused_before_it_is_parsed(
    http: httpx.AsyncClient, script: Script
) -> None:
    many = json.dumps({"model": "base", "prompt": [[1]] * 70_000})
    response = await http.post("/v1/completions", content=many, headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "too_many_json_containers"
    assert "70,002 JSON arrays and objects" in error["message"]
    # Brackets inside strings are text, not structure.
    text = {"model": "base", "prompt": '"[{\\' * 40_000}
    assert (await http.post("/tokenize", json=text)).status_code == 200
    assert script.bodies == []


async def test_long_tokenizer_answers_are_what_they_were(http: httpx.AsyncClient, gateway: Gateway) -> None:
    text = "Ünïcode “quotes” and \\ backslashes, <|im_start|> " * 400
    tokenizer = gateway.tokenizers["base"]
    ids = tokenizer.encode(text)
    assert len(ids) > 4096  # built in a thread, in slices
    strings = tokenizer.token_strings(ids)
    expected = {"count": len(ids), "max_model_len": 2048, "tokens": ids, "token_strs": strings}
    response = await http.post("/tokenize", json={"model": "base", "prompt": text, "return_token_strs": True})
    assert response.content == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
    plain = await http.post("/tokenize", json={"model": "base", "prompt": text})
    assert plain.json() == {**expected, "token_strs": None}
    decoded = await http.post("/detokenize", json={"model": "base", "tokens": ids})
    assert decoded.json() == {"prompt": tokenizer.decode(ids)}
