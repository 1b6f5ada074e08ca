"""The caps: what each one counts, and the field a refusal names."""

from __future__ import annotations

import pytest

from service.core.caps import enforce_caps, prompt_chars
from service.core.protocol import (
    ChatRequest,
    CompleteRequest,
    V1BatchChatRequest,
    V1ChatRequest,
    V1CompletionRequest,
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
        (V1ChatRequest(messages=HI, max_completion_tokens=65), "max_tokens"),
        (V1CompletionRequest(prompt="x", logprobs=3), "logprobs"),
        (V1CompletionRequest(prompt="x", prompt_logprobs=-1), "prompt_logprobs"),
        (V1CompletionRequest(prompt=["a"] * 5), "prompt"),
        (V1BatchChatRequest(messages=[HI] * 5), "messages"),
        (ChatRequest(messages=HI * 4), "messages"),
        (V1ChatRequest(messages=HI, tools=[{"description": "d" * 101}]), "messages characters"),
        (
            CompleteRequest(prompt="x", examples=[{"input": "a" * 40, "output": "b" * 40}]),
            "prompt characters",
        ),
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
    counted, chars = prompt_chars(request_)
    assert counted == "messages" and chars >= len("abc") + len("12345")
