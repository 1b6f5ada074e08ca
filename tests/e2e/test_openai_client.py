"""The official `openai` client against the gateway's /v1 endpoints, real workers behind."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL, Stack


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models_list_kinds_and_context(oai: openai.OpenAI) -> None:
    models = {model.id: model for model in oai.models.list()}
    assert set(models) == {BASE_MODEL, INSTRUCT_MODEL}
    extra = models[BASE_MODEL].model_extra or {}
    assert (extra["kind"], extra["max_model_len"], extra["ready"]) == ("base", 2048, True)
    assert extra["root"].endswith("gemma-3-270m") and "parent" in extra  # the worker's own entry
    assert (models[INSTRUCT_MODEL].model_extra or {})["kind"] == "instruct"


def test_completion(oai: openai.OpenAI) -> None:
    result = oai.completions.create(model=BASE_MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert result.model == BASE_MODEL
    assert result.choices[0].text
    assert result.usage is not None and result.usage.completion_tokens <= 8


def test_completion_stream_with_usage(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=BASE_MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    chunks = list(
        oai.completions.create(
            model=BASE_MODEL,
            prompt="The sky is",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_completion_logprobs_penalties_and_ignore_eos(oai: openai.OpenAI) -> None:
    result = oai.completions.create(
        model=BASE_MODEL,
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.1},
    )
    assert result.choices[0].logprobs is not None
    assert len(result.choices[0].logprobs.tokens or []) == 5
    assert result.usage is not None and result.usage.completion_tokens == 5


def test_chat_completion(oai: openai.OpenAI) -> None:
    result = oai.chat.completions.create(
        model=INSTRUCT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=40,
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert "Paris" in (result.choices[0].message.content or "")
    assert result.choices[0].finish_reason == "stop"


def test_chat_completion_stream_with_usage_and_logprobs(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    whole = oai.chat.completions.create(model=INSTRUCT_MODEL, messages=messages, temperature=0, max_tokens=10)  # type: ignore[arg-type]
    stream = oai.chat.completions.create(
        model=INSTRUCT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=10,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    with_logprobs = [c for c in chunks if c.choices and c.choices[0].logprobs]
    assert with_logprobs and len(with_logprobs[0].choices[0].logprobs.content[0].top_logprobs) == 2  # type: ignore[union-attr, index]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_chat_n_seed_and_stop(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    result = oai.chat.completions.create(
        model=INSTRUCT_MODEL,
        messages=messages,
        n=2,
        seed=3,
        temperature=0.7,  # type: ignore[arg-type]
        max_tokens=30,
        stop=["five"],
    )
    assert [choice.index for choice in result.choices] == [0, 1]
    assert all("five" not in (choice.message.content or "") for choice in result.choices)


def test_chat_on_a_base_model_is_a_clear_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "Hi"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "model"
    assert "base model" in error["message"] and "/complete" in error["message"]


def test_unknown_model_is_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="no-such-model", prompt="x")
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "model"
