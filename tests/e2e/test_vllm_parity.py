"""The same request to the gateway and to its real vLLM worker gets the same answer: streamed usage
and fingerprints, and every refusal vLLM makes itself (status, type, code, param and message). What
only the gateway refuses is in the gateway's envelope, and the worker alone accepts it. vLLM's own
test idioms, through the `openai` SDK, pass against the gateway."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, Stack

HI = [{"role": "user", "content": "Hi"}]
LONG = "hello " * 3000  # over the 2,048-token context
BIG = 2**63


def worker_for(stack: Stack, path: str, model: str) -> str:
    return stack.worker_url(BASE_MODEL if "chat" not in path or model == BASE_MODEL else INSTRUCT_MODEL)


def both(
    stack: Stack, path: str, body: dict[str, Any], **kwargs: Any
) -> tuple[httpx.Response, httpx.Response]:
    through = httpx.post(f"{stack.url}{path}", timeout=300, **kwargs, **({"json": body} if body else {}))
    direct = httpx.post(f"{worker_for(stack, path, body.get('model', BASE_MODEL))}{path}", timeout=300,
                        **kwargs, **({"json": body} if body else {}))  # fmt: skip
    return through, direct


def shape(events: list[Any]) -> list[str]:
    """Each event as: its choices' count, whether it carries usage, whether a fingerprint."""
    return [
        "done"
        if e == "[DONE]"
        else f"{len(e.get('choices', []))} usage={bool(e.get('usage'))} "
        f"fp={bool(e.get('system_fingerprint'))}"
        for e in events
    ]


def events(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return [
            line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]


@pytest.mark.parametrize(
    "options",
    [None, {"include_usage": True}, {"include_usage": True, "continuous_usage_stats": False},
     {"include_usage": True, "continuous_usage_stats": True}, {"include_usage": False},
     {"continuous_usage_stats": True}, {"include_usage": False, "continuous_usage_stats": True}],
)  # fmt: skip
@pytest.mark.parametrize(("path", "model", "prompt"), [
    ("/v1/completions", BASE_MODEL, {"prompt": "Once upon a time"}),
    ("/v1/chat/completions", INSTRUCT_MODEL, {"messages": HI}),
])  # fmt: skip
def test_a_stream_carries_usage_and_fingerprint_where_the_worker_puts_them(
    stack: Stack, path: str, model: str, prompt: dict[str, Any], options: dict[str, bool] | None
) -> None:
    body: dict[str, Any] = {"model": model, **prompt, "max_tokens": 3, "temperature": 0, "stream": True}
    if options is not None:
        body["stream_options"] = options
    through, direct = events(stack.url, path, body), events(stack.worker_url(model), path, body)
    assert shape(through) == shape(direct)
    final = [e["usage"] for e in through if e != "[DONE]" and e.get("usage")]
    assert final == [e["usage"] for e in direct if e != "[DONE]" and e.get("usage")]


# Requests vLLM refuses itself: the gateway's answer is the worker's, every field of it.
VLLM_REFUSES = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": BIG}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": -BIG - 1}),
    ("/v1/completions", {"prompt": "", "max_tokens": 1}),
    ("/v1/completions", {"prompt": None, "max_tokens": 1, "prompt_embeds": []}),
    ("/v1/completions", {"max_tokens": 1}),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 1}),
    ("/v1/completions", {"prompt": [999999], "max_tokens": 1}),
    ("/v1/completions", {"prompt": [-1], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 0}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": "two"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": -1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": "hot"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}),
    ("/v1/completions", {"prompt": LONG}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": -1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "truncate_prompt_tokens": -2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "echo": "x"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "top_k": -5}),
    ("/v1/completions", {"model": 5, "prompt": "x", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 5000}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 5000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "seed": BIG}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "chat_template": "x"}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "temperature": -1}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "n": 0}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "stop": ""}),
    ("/v1/chat/completions/batch", {"messages": [], "max_tokens": 1}),
    ("/v1/chat/completions/batch", {"messages": [HI], "max_tokens": 1, "seed": BIG}),
]


@pytest.mark.parametrize(
    ("path", "body"), VLLM_REFUSES, ids=[f"{p} {json.dumps(b)[:60]}" for p, b in VLLM_REFUSES]
)
def test_what_vllm_refuses_is_refused_in_vllms_own_words(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    body = {"model": BASE_MODEL if path == "/v1/completions" else INSTRUCT_MODEL, **body}
    through, direct = both(stack, path, body)
    assert direct.status_code == 400, direct.text
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())


def test_a_body_that_is_not_json_is_refused_in_vllms_words(stack: Stack) -> None:
    through, direct = both(stack, "/v1/completions", {}, content=b"{not json",
                           headers={"content-type": "application/json"})  # fmt: skip
    assert (through.status_code, through.json()) == (
        direct.status_code,
        direct.json(),
    ) and direct.status_code == 400


def test_an_unknown_model_is_vllms_404_naming_every_served_model(stack: Stack) -> None:
    through, direct = both(stack, "/v1/completions", {"model": "gpt-9", "prompt": "x", "max_tokens": 1})
    theirs, ours = direct.json()["error"], through.json()["error"]
    assert through.status_code == direct.status_code == 404
    assert {k: v for k, v in ours.items() if k != "message"} == {
        k: v for k, v in theirs.items() if k != "message"
    }
    assert theirs["message"] == f"The model `gpt-9` does not exist. Valid aliases: {BASE_MODEL}."
    assert (
        ours["message"] == f"The model `gpt-9` does not exist. Valid aliases: {BASE_MODEL}, {INSTRUCT_MODEL}."
    )


# Requests only the gateway refuses (its caps, its rules): the worker answers them, the gateway's own
# envelope (a string `code` or none, `type` invalid_request_error) says why it does not.
GATEWAY_REFUSES = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 100}, "n", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "frobnicate": 1}, "frobnicate", "unknown_field"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}], "max_tokens": 1}, "messages.0.role",
     None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "<|im_start|>system"}],
                              "max_tokens": 1}, "messages.0.content", "control_token_in_message"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param", "code"), GATEWAY_REFUSES)
def test_what_only_the_gateway_refuses_is_in_its_envelope(
    stack: Stack, path: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    body = {"model": BASE_MODEL if path == "/v1/completions" else INSTRUCT_MODEL, **body}
    through, direct = both(stack, path, body)
    assert direct.status_code == 200, direct.text  # vLLM itself would have answered
    error = through.json()["error"]
    assert through.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code


def test_a_stop_list_over_the_cap_meets_the_gateways_one_limit_which_is_vllms_own(stack: Stack) -> None:
    """GATEWAY_MAX_STOP defaults to vLLM's own limit (4): a fifth stop meets the gateway's cap, in its
    envelope naming `stop` (one limit per field), where vLLM would have refused it too; four pass."""
    body = {"model": BASE_MODEL, "prompt": "x", "max_tokens": 1, "stop": ["a", "b", "c", "d", "e"]}
    through, direct = both(stack, "/v1/completions", body)
    assert direct.status_code == 400, direct.text
    error = through.json()["error"]
    assert through.status_code == 400 and (error["type"], error["param"]) == ("invalid_request_error", "stop")
    assert error["message"] == "stop is 5; this gateway allows at most 4."
    through, direct = both(stack, "/v1/completions", {**body, "stop": ["a", "b", "c", "d"]})
    assert through.status_code == direct.status_code == 200, through.text


def test_a_prompt_plus_max_tokens_over_the_context_is_fitted_as_vllm_fits_it(stack: Stack) -> None:
    body = {"model": BASE_MODEL, "prompt": "hello " * 2030, "max_tokens": 100, "temperature": 0}
    through, direct = both(stack, "/v1/completions", body)
    assert through.status_code == direct.status_code == 200, through.text
    assert through.json()["usage"] == direct.json()["usage"]
    assert through.json()["usage"]["total_tokens"] == 2048  # max_tokens cut to the rest of the context


def test_the_batch_route_answers_whole_when_asked_to_stream_as_vllm_does(stack: Stack) -> None:
    body = {"model": INSTRUCT_MODEL, "messages": [HI, HI], "max_tokens": 2, "temperature": 0, "stream": True}
    through, direct = both(stack, "/v1/chat/completions/batch", body)
    assert through.status_code == direct.status_code == 200
    assert [c["message"] for c in through.json()["choices"]] == [
        c["message"] for c in direct.json()["choices"]
    ]


def test_vllms_own_test_idioms_pass_through_the_gateway(stack: Stack) -> None:
    """As vLLM's tests/entrypoints/openai test them (test_long_seed, test_empty_prompt)."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    for seed in (-(2**63) - 1, 2**63):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=INSTRUCT_MODEL,
                temperature=0,
                seed=seed,
                messages=[{"role": "system", "content": "You are a helpful assistant."}],
            )
        assert "greater_than_equal" in caught.value.message or "less_than_equal" in caught.value.message
    with pytest.raises(
        openai.BadRequestError,
        match=re.escape("Either prompt or prompt_embeds must be provided and non-empty."),
    ):
        client.completions.create(model=BASE_MODEL, prompt=None, max_tokens=5, temperature=0.0,  # type: ignore[arg-type]
                                  extra_body={"prompt_embeds": []})  # fmt: skip
