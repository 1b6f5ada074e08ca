from __future__ import annotations

from service.core.translate import NativeStream, native_complete


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
