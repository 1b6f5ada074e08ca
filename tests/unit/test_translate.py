from __future__ import annotations

from service.translate import NativeStream, OpenAIChatStream, chat_logprobs, native_complete


def test_completion_logprobs_become_chat_logprobs() -> None:
    logprobs = {
        "tokens": ["Hi", "!"],
        "token_logprobs": [-0.1, -0.5],
        "top_logprobs": [{"Hi": -0.1, "Hello": -2.0}, {"!": -0.5, ".": -0.9}],
        "text_offset": [0, 2],
    }
    converted = chat_logprobs(logprobs, top=1)
    assert converted == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
            },
            {
                "token": "!",
                "logprob": -0.5,
                "bytes": [33],
                "top_logprobs": [{"token": "!", "logprob": -0.5, "bytes": [33]}],
            },
        ]
    }
    assert chat_logprobs(None, 2) is None


def test_native_complete_puts_the_first_choice_on_top() -> None:
    data = {
        "id": "cmpl-1",
        "choices": [
            {"index": 1, "text": "b", "finish_reason": "stop"},
            {"index": 0, "text": "a", "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    body = native_complete(data, "m")
    assert (body["text"], body["finish_reason"]) == ("a", "length")
    assert [c["text"] for c in body["choices"]] == ["a", "b"]


def test_native_stream_closes_with_finish_reason_and_usage() -> None:
    stream = NativeStream("m", "delta")
    assert stream.on_chunk({"id": "c", "choices": [{"index": 0, "text": "Hi"}]}) == [
        {"index": 0, "delta": "Hi"}
    ]
    stream.on_chunk({"id": "c", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    stream.on_chunk(
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    )
    assert stream.finish() == [
        {
            "id": "c",
            "model": "m",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    ]


def test_openai_chat_stream_sends_the_role_once_per_choice() -> None:
    stream = OpenAIChatStream("m", include_usage=False, top_logprobs=0)
    first = stream.on_chunk(
        {"id": "cmpl-x", "choices": [{"index": 0, "text": "A"}, {"index": 1, "text": "B"}]}
    )
    roles = [e["choices"][0]["delta"] for e in first if "role" in e["choices"][0]["delta"]]
    assert len(roles) == 2
    again = stream.on_chunk({"id": "cmpl-x", "choices": [{"index": 0, "text": "C"}]})
    assert [e["choices"][0]["delta"] for e in again] == [{"content": "C"}]
    assert again[0]["id"] == "chatcmpl-x"
    assert stream.finish() == []
