"""The gateway as a faithful superset of vLLM's OpenAI server, shown with the clients people point at
vLLM (the `openai` SDK, LangChain, lm-evaluation-harness) against the real workers, and compared with
the same requests sent to a worker directly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from service import __version__
from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, SMOL, Stack

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city", "strict": True,
                 "parameters": WEATHER_PARAMETERS},
}  # fmt: skip
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Fields the gateway reads itself, so an arbitrary null is not a fair probe of them.
GATEWAY_FIELDS = {"model", "prompt", "messages"}


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


def worker_schema(stack: Stack, model: str, name: str) -> set[str]:
    openapi = httpx.get(f"{stack.worker_url(model)}/openapi.json", timeout=30).json()
    return set(openapi["components"]["schemas"][name]["properties"])


@pytest.mark.parametrize(
    ("path", "model", "schema", "base"),
    [
        ("/v1/completions", BASE_MODEL, "CompletionRequest", {"prompt": "Hi", "max_tokens": 1}),
        (
            "/v1/chat/completions",
            INSTRUCT_MODEL,
            "ChatCompletionRequest",
            {"messages": QUESTION, "max_tokens": 1},
        ),
    ],
)
def test_every_field_the_worker_accepts_passes_and_no_other(
    stack: Stack, client: httpx.Client, path: str, model: str, schema: str, base: dict[str, Any]
) -> None:
    """Read live from the worker: if a vLLM upgrade adds a field, this fails unless it passes too."""
    refused = []
    for field in sorted(worker_schema(stack, model, schema) - GATEWAY_FIELDS):
        response = client.post(path, json={"model": model, **base, field: None})
        if response.json().get("error", {}).get("code") == "unknown_field":
            refused.append(field)
    assert refused == []
    unknown = client.post(path, json={"model": model, **base, "frobnicate": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "frobnicate"


def test_echo_returns_the_prompt_as_sent_and_the_workers_logprobs(stack: Stack, client: httpx.Client) -> None:
    body = {
        "model": BASE_MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    }
    through = client.post("/v1/completions", json=body).json()
    direct = httpx.post(f"{stack.worker_url(BASE_MODEL)}/v1/completions", json=body, timeout=60).json()
    assert through["choices"][0]["text"] == "The capital of France is"
    assert through["choices"][0]["logprobs"] == direct["choices"][0]["logprobs"]
    assert through["system_fingerprint"] == direct["system_fingerprint"]  # the worker's fields are kept


def test_scoring_a_continuation_matches_the_workers_echoed_logprobs(
    stack: Stack, client: httpx.Client
) -> None:
    scored = client.post("/complete", json={"prompt": "The capital of France is", "continuation": " Paris."})
    assert scored.status_code == 200, scored.text
    result = scored.json()
    ids = [token["id"] for token in result["tokens"]]
    whole = client.post("/tokenize", json={"prompt": "The capital of France is Paris."}).json()["tokens"]
    assert whole[result["context_tokens"] :] == ids
    direct = httpx.post(
        f"{stack.worker_url(BASE_MODEL)}/v1/completions",
        json={"model": BASE_MODEL, "prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 0},
        timeout=60,
    ).json()
    echoed = direct["choices"][0]["logprobs"]["token_logprobs"][result["context_tokens"] :]
    assert result["loglikelihood"] == pytest.approx(sum(echoed), abs=1e-5)
    assert [t["logprob"] for t in result["tokens"]] == pytest.approx(echoed, abs=1e-5)


def test_oversized_scoring_is_refused_with_the_numbers(client: httpx.Client) -> None:
    long_prompt = "word " * 1200  # ~1,200 tokens x Gemma's 262,144-entry vocabulary
    response = client.post("/v1/completions", json={"model": BASE_MODEL, "prompt": long_prompt,
                                                     "max_tokens": 1, "prompt_logprobs": 0})  # fmt: skip
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "scoring_budget_exceeded"
    assert "262,144" in error["message"] and "at most 1,024 prompt tokens" in error["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_match_the_schema(oai: openai.OpenAI, choice: Any) -> None:
    result = oai.chat.completions.create(
        model=INSTRUCT_MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice=choice, temperature=0,
        max_tokens=60,
    )  # type: ignore[call-overload]  # fmt: skip
    calls = result.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_PARAMETERS)


def test_a_tool_round_trip_answers(oai: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages: list[Any] = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    result = oai.chat.completions.create(
        model=INSTRUCT_MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=30,
        temperature=0,
    )  # type: ignore[call-overload]  # fmt: skip
    assert result.choices[0].message.content


def test_sdk_parse_returns_a_validated_object(oai: openai.OpenAI) -> None:
    result = oai.chat.completions.parse(
        model=INSTRUCT_MODEL, messages=[{"role": "user", "content": "Name a city and its country."}],
        response_format=City, temperature=0, max_tokens=60,
    )  # fmt: skip
    parsed = result.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(stack: Stack, method: str) -> None:
    llm = ChatOpenAI(base_url=f"{stack.url}/v1", api_key="unused", model=INSTRUCT_MODEL, temperature=0,
                     max_tokens=60, max_retries=0)  # type: ignore[arg-type]  # fmt: skip
    structured = llm.with_structured_output(City, method=method, strict=True)  # type: ignore[arg-type]
    result = structured.invoke("Name a city and its country.")
    assert isinstance(result, City) and result.name


def test_langchain_bind_tools(stack: Stack) -> None:
    llm = ChatOpenAI(base_url=f"{stack.url}/v1", api_key="unused", model=INSTRUCT_MODEL, temperature=0,
                     max_tokens=60, max_retries=0)  # type: ignore[arg-type]  # fmt: skip
    bound = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather", strict=True)
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER_PARAMETERS)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "extra",
    [{}, {"tools": [WEATHER_TOOL]}, {"messages": [{"role": "developer", "content": "Be brief."}, *QUESTION]}],
)
def test_the_gateways_rendering_is_what_the_worker_tokenized(
    client: httpx.Client, extra: dict[str, Any]
) -> None:
    body = {"model": INSTRUCT_MODEL, "messages": QUESTION, "max_tokens": 1, "return_token_ids": True, **extra}
    answer = client.post("/v1/chat/completions", json=body).json()
    own = client.post(
        "/tokenize", json={k: v for k, v in body.items() if k in {"model", "messages", "tools"}}
    )
    assert answer["prompt_token_ids"] == own.json()["tokens"]


def test_the_rendering_follows_a_template_override_on_both_sides(smol: Stack) -> None:
    body = {"model": SMOL, "messages": QUESTION, "max_tokens": 1, "return_token_ids": True}
    answer = httpx.post(f"{smol.url}/v1/chat/completions", json=body, timeout=120).json()
    rendered = httpx.post(f"{smol.url}/chat/render", json={"messages": QUESTION}, timeout=60).json()
    assert "[override] What is the weather" in rendered["prompt"]
    assert answer["prompt_token_ids"] == rendered["token_ids"]


def test_tokenizer_routes_agree_with_the_worker(stack: Stack, client: httpx.Client) -> None:
    worker = stack.worker_url(INSTRUCT_MODEL)
    for body in ({"prompt": "Hello there"}, {"messages": QUESTION}):
        body = {"model": INSTRUCT_MODEL, **body}
        ours, theirs = (
            client.post("/tokenize", json=body).json(),
            httpx.post(f"{worker}/tokenize", json=body).json(),
        )
        assert ours["tokens"] == theirs["tokens"] and ours["count"] == theirs["count"]
    ids = {"model": BASE_MODEL, "tokens": [2, 818, 5279, 529, 7001, 563]}
    ours = client.post("/detokenize", json=ids).json()
    assert ours == httpx.post(f"{stack.worker_url(BASE_MODEL)}/detokenize", json=ids).json()
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<eos>"
    base_len = httpx.get(f"{stack.worker_url(BASE_MODEL)}/v1/models").json()["data"][0]["max_model_len"]
    assert info["model_max_length"] == base_len == 2048  # the real context, not the file's 1e30
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    direct = httpx.get(f"{worker}/v1/models").json()["data"][0]
    assert models[INSTRUCT_MODEL]["root"] == direct["root"] and "parent" in models[INSTRUCT_MODEL]


def test_version_is_vllms_shape_and_the_gateways_own_is_on_health(stack: Stack, client: httpx.Client) -> None:
    worker = stack.worker_url(INSTRUCT_MODEL)
    assert client.get("/version").json() == httpx.get(f"{worker}/version").json()  # no key of its own
    assert client.get("/health").json() == {"status": "ok", "version": __version__}


def test_a_workers_own_refusal_reaches_the_client_in_its_words(stack: Stack, client: httpx.Client) -> None:
    body = {"model": INSTRUCT_MODEL, "messages": QUESTION, "temperature": -1}
    through = client.post("/v1/chat/completions", json=body)
    direct = httpx.post(f"{stack.worker_url(INSTRUCT_MODEL)}/v1/chat/completions", json=body)
    assert through.status_code == direct.status_code == 400
    assert through.json()["error"]["message"] == direct.json()["error"]["message"]


def test_responses_api_streams_and_answers(oai: openai.OpenAI) -> None:
    answer = oai.responses.create(model=INSTRUCT_MODEL, input="What is the capital of France?",
                                  max_output_tokens=20, temperature=0)  # fmt: skip
    assert "Paris" in answer.output_text
    events = list(oai.responses.create(model=INSTRUCT_MODEL, input="Hi", max_output_tokens=5, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert any(event.type == "response.output_text.delta" for event in events)
