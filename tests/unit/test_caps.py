"""The caps: what each one counts, and the field a refusal names."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from service.core.caps import enforce_caps, prompt_chars, prompt_logprobs_source
from service.core.protocol import (
    ChatRequest,
    CompleteRequest,
    DetokenizeRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
    V1ResponsesRequest,
)
from service.errors import InvalidRequest
from service.ops.settings import Settings

SETTINGS = Settings(
    max_n=2,
    max_stop=2,
    max_tokens_limit=64,
    max_logprobs=2,
    max_messages=3,
    max_prompt_chars=100,
    max_prompts=4,
)
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (CompleteRequest(prompt="x", n=3), "n"),
        (CompleteRequest(prompt="x", stop=["a", "b", "c"]), "stop"),
        (V1ChatRequest(messages=HI, max_completion_tokens=65), "max_completion_tokens"),
        (V1ChatRequest(messages=HI, max_tokens=65), "max_tokens"),
        (V1ChatRequest(messages=HI, logprobs=True, top_logprobs=3), "top_logprobs"),
        (V1ResponsesRequest(input="x", max_output_tokens=65), "max_output_tokens"),
        (V1CompletionRequest(prompt="x", logprobs=3), "logprobs"),
        (V1CompletionRequest(prompt="x", prompt_logprobs=-1), "prompt_logprobs"),
        (V1CompletionRequest(prompt=["a"] * 5), "prompt"),
        (V1BatchChatRequest(messages=[HI] * 5), "messages"),
        (ChatRequest(messages=HI * 4), "messages"),
        (V1ChatRequest(messages=HI, tools=[{"description": "d" * 101}]), "messages"),
        (CompleteRequest(prompt="x" * 101), "prompt"),
        (CompleteRequest(prompt="x", examples=[{"input": "a" * 40, "output": "b" * 40}]), "examples"),
    ],
)
def test_each_cap_refuses_naming_its_field(request_: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        enforce_caps(request_, SETTINGS)  # type: ignore[arg-type]
    assert caught.value.param == param


def test_at_the_caps_is_allowed() -> None:
    at_caps = [
        CompleteRequest(prompt="x" * 100, n=2, stop=["a", "b"], max_tokens=64),
        V1CompletionRequest(prompt=["a"] * 4, logprobs=2),
        ChatRequest(messages=HI * 3),
    ]
    for request_ in at_caps:
        enforce_caps(request_, SETTINGS)


def test_every_text_of_a_chat_counts() -> None:
    request_ = V1ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "abc"}]}],
                             tools=[{"function": {"description": "12345"}}])  # fmt: skip
    counted = prompt_chars(request_)
    assert counted.param == "messages" and counted.chars >= len("abc") + len("12345")


@pytest.mark.parametrize(
    ("request_", "source"),
    [
        # vLLM's to_sampling_params: prompt_logprobs, else with echo the logprobs asked for.
        (V1CompletionRequest(prompt="x", prompt_logprobs=0), "prompt_logprobs"),
        (V1CompletionRequest(prompt="x", echo=True, logprobs=0), "echo"),
        (V1CompletionRequest(prompt="x", echo=True), None),  # completions: no logprobs, none
        (V1CompletionRequest(prompt="x", logprobs=5), None),
        (V1ChatRequest(messages=HI, echo=True), "echo"),  # chat: top_logprobs defaults to 0
        (V1ChatRequest(messages=HI, echo=True, top_logprobs=None), "echo"),  # null means 0 too
        (V1ChatRequest(messages=HI, echo=True, prompt_logprobs=2), "prompt_logprobs"),
        (V1ChatRequest(messages=HI, logprobs=True, top_logprobs=5), None),
        (V1BatchChatRequest(messages=[HI, HI], echo=True), "echo"),
        (CompleteRequest(prompt="x", continuation=" y"), "continuation"),
        (CompleteRequest(prompt="x"), None),
    ],
)
def test_prompt_logprobs_are_derived_as_vllm_derives_them(request_: object, source: str | None) -> None:
    assert prompt_logprobs_source(request_) == source  # type: ignore[arg-type]


def test_a_continuation_counts_with_its_prompt() -> None:
    at_cap = CompleteRequest(prompt="x" * 60, continuation="y" * 40)
    assert prompt_chars(at_cap).chars == 100
    enforce_caps(at_cap, SETTINGS)
    with pytest.raises(InvalidRequest) as caught:
        enforce_caps(CompleteRequest(prompt="x" * 60, continuation="y" * 41), SETTINGS)
    assert caught.value.param == "continuation"
    assert caught.value.message == (
        "The prompt with the continuation to score is 101 characters; this gateway allows at most 100."
    )


@pytest.mark.parametrize(
    "request_",
    [
        V1ChatRequest(messages=HI, logprobs=True, logprob_token_ids=[1, 2, 3]),
        V1BatchChatRequest(messages=[HI], logprobs=True, logprob_token_ids=[1, 2, 3]),
        V1CompletionRequest(prompt="x", logprobs=1, logprob_token_ids=[1, 2, 3]),
    ],
)
def test_logprob_token_ids_count_as_logprobs(request_: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        enforce_caps(request_, SETTINGS)  # type: ignore[arg-type]
    assert caught.value.param == "logprob_token_ids" and "3 ids" in caught.value.message
    enforce_caps(V1ChatRequest(messages=HI, logprobs=True, logprob_token_ids=[1, 2]), SETTINGS)


def test_detokenize_takes_at_most_the_configured_ids() -> None:
    settings = Settings(max_detokenize_tokens=3)
    enforce_caps(DetokenizeRequest(tokens=[1, 2, 3]), settings)
    with pytest.raises(InvalidRequest) as caught:
        enforce_caps(DetokenizeRequest(tokens=[1, 2, 3, 4]), settings)
    assert caught.value.param == "tokens" and "4" in caught.value.message


def test_a_body_no_longer_than_the_character_cap_is_not_walked_and_a_longer_one_is() -> None:
    def parsed(content: str) -> V1ChatRequest:
        body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
        request = V1ChatRequest.model_validate_json(body)
        request.keep_raw(body)
        return request

    small = parsed("x" * 40)  # its text can't be longer than its body
    assert small.body_bytes is not None and small.body_bytes <= 100
    enforce_caps(small, SETTINGS)
    enforce_caps(parsed("é" * 20 + "x" * 76), SETTINGS)  # 100 characters with "user", a longer body: walked
    with pytest.raises(InvalidRequest):
        enforce_caps(parsed("é" * 20 + "x" * 77), SETTINGS)


@pytest.mark.parametrize(
    ("model", "body", "param", "cap"),
    [
        (CompleteRequest, {"prompt": "x", "n": 10}, "n", 8),
        (CompleteRequest, {"prompt": "x", "n": 100}, "n", 8),
        (CompleteRequest, {"prompt": "x", "stop": ["s"] * 5}, "stop", 4),
        (CompleteRequest, {"prompt": "x", "stop": ["s"] * 100}, "stop", 4),
        (ChatRequest, {"messages": HI * 300}, "messages", 256),
        (ChatRequest, {"messages": HI * 2000}, "messages", 256),
        (V1ChatRequest, {"messages": HI * 2000}, "messages", 256),
        (V1BatchChatRequest, {"messages": [HI] * 2000}, "messages", 1024),
        (DetokenizeRequest, {"tokens": [1] * 1_000_001}, "tokens", 131_072),
    ],
)
def test_one_limit_per_field_the_configured_cap_whatever_the_amount(
    model: type[BaseModel], body: dict[str, object], param: str, cap: int
) -> None:
    """Just over the cap and far over it: the same refusal, naming the configured cap (never a
    second, built-in limit that a larger amount would meet first)."""
    request_ = model.model_validate_json(json.dumps(body))  # as the dispatcher parses it
    with pytest.raises(InvalidRequest) as caught:
        enforce_caps(request_, Settings())
    assert caught.value.param == param and f"at most {cap:,}" in caught.value.message
