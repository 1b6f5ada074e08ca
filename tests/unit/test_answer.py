"""A worker's whole answer kept as bytes: its usage found without parsing it, the rest parsed only
for native answers (large ones by a decoder that lets other threads run)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from service.errors import UpstreamUnavailable
from service.workers.answer import Answer, find_usage, looks_like_object, parse_answer, yielding_loads

USAGE = {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None}


def answer_bytes(**fields: object) -> bytes:
    return json.dumps({"id": "cmpl-1", "model": "m", **fields}, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "raw",
    [
        answer_bytes(choices=[{"text": "hi", "finish_reason": "stop"}], usage=USAGE),
        # Text and token keys that look like usage: escaped inside strings, or keys of numbers.
        answer_bytes(
            choices=[{"text": '"usage":{"prompt_tokens":9}', "logprobs": {"top_logprobs": [{"usage": -1}]}}],
            usage=USAGE,
            prompt_logprobs=[None, {"12": {"logprob": -1.0, "decoded_token": '"usage": {"x": 1}'}}],
            kv_transfer_params=None,
        ),
        json.dumps({"id": "x", "usage": USAGE, "choices": []}, indent=2).encode(),  # spaces allowed
    ],
)
def test_the_usage_found_is_the_answers_own(raw: bytes) -> None:
    assert find_usage(raw) == USAGE
    assert Answer.of(raw).usage == USAGE


@pytest.mark.parametrize(
    "raw", [answer_bytes(choices=[]), answer_bytes(usage=None), answer_bytes(text="\\", usage=3)]
)
def test_no_usage_object_is_none(raw: bytes) -> None:
    assert find_usage(raw) is None


def test_a_summary_is_read_from_the_bytes() -> None:
    raw = answer_bytes(choices=[{"finish_reason": "stop"}, {"finish_reason": "length"}], usage=USAGE)
    assert Answer.of(raw).summary() == ("cmpl-1", "m", ["stop", "length"])


def test_only_an_object_frame_passes() -> None:
    assert looks_like_object(b' {"a": 1}\n') and looks_like_object(bytearray(b"{}"))
    assert not looks_like_object(b"<html>not json</html>") and not looks_like_object(b'{"a": ')


async def test_large_answers_parse_to_the_same_object_and_bad_ones_are_the_workers_fault() -> None:
    small = answer_bytes(choices=[{"text": "é\\n", "index": 0}], usage=USAGE)
    large = answer_bytes(choices=[{"text": "x" * 100, "index": i, "n": 1.5} for i in range(20_000)])
    assert len(large) > 1 << 20  # parsed in a thread
    for raw in (small, large):
        assert await parse_answer(raw, "m") == json.loads(raw)
    for broken in (b'{"choices": [}', b"[1, 2]", b"{" + b"\xff" * 10 + b"}"):
        with pytest.raises(UpstreamUnavailable, match="malformed"):
            await parse_answer(broken, "m")


def turns_taken(parse: Callable[[bytes], object], raw: bytes) -> tuple[int, float]:
    """How often this thread got to run (1 ms sleeps) while another thread ran `parse(raw)`, and the
    longest this thread had to wait for a turn."""
    done = threading.Event()

    def run() -> None:
        parse(raw)
        done.set()

    worker = threading.Thread(target=run)
    turns, longest = 0, 0.0
    worker.start()
    while not done.is_set():
        before = time.perf_counter()
        time.sleep(0.001)
        longest = max(longest, time.perf_counter() - before)
        turns += 1
    worker.join()
    return turns, longest


def test_the_yielding_decoder_lets_another_thread_run() -> None:
    # Large enough (~25 MB) that json.loads holds the GIL far longer than a garbage collection pause.
    raw = answer_bytes(choices=[{"index": i, "top": {"a": -1.0, "b": [1, 2, 3]}} for i in range(400_000)])
    held_turns, _ = turns_taken(json.loads, raw)  # json.loads holds the GIL for the whole parse
    turns, _ = turns_taken(yielding_loads, raw)
    # It gives the GIL up every few milliseconds: the other thread gets many turns where json.loads gives
    # it a few (3 idle, 57 once under heavy load, against ~500). Turns are counted, not timed: on a loaded
    # machine the OS alone can make any wait long, but it cannot make a thread that holds the GIL take turns.
    assert turns > 50 and turns > 3 * max(1, held_turns), (turns, held_turns)
