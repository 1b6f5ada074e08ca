"""/complete on the real base model (Gemma 3 270M on a vLLM CPU worker)."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL
from tests.helpers import stream_post

BOS = 2


def test_complete_continues_text_on_the_default_base_model(client: httpx.Client) -> None:
    response = client.post(
        "/complete", json={"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == BASE_MODEL
    assert body["text"].strip(), body
    assert body["finish_reason"] in {"length", "stop"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 12
    assert body["choices"][0]["text"] == body["text"]


def test_base_prompt_starts_with_bos_exactly_once(client: httpx.Client) -> None:
    for prompt in ("The capital of France is", "<bos>The capital of France is"):
        response = client.post(
            "/complete", json={"prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
        )
        assert response.status_code == 200, response.text
        ids = response.json()["prompt_token_ids"]  # as the worker received them
        assert ids[0] == BOS and ids[1] != BOS, (prompt, ids[:4])
        assert ids.count(BOS) == 1


def test_few_shot_examples_steer_the_pattern_and_stop_at_its_boundary(client: httpx.Client) -> None:
    examples = [
        {"input": "cat", "output": "CAT"},
        {"input": "dog", "output": "DOG"},
        {"input": "house", "output": "HOUSE"},
    ]
    response = client.post(
        "/complete", json={"prompt": "bird", "examples": examples, "temperature": 0, "max_tokens": 20}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "BIRD" in body["text"], body
    assert body["finish_reason"] == "stop"
    assert "\n" not in body["text"]
    assert body["usage"]["completion_tokens"] < 20


def test_streamed_completion_matches_the_unstreamed_one(client: httpx.Client) -> None:
    request = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    whole = client.post("/complete", json=request).json()
    events, done = stream_post(client, "/complete", {**request, "stream": True})
    assert done
    *pieces, last = events
    assert "".join(event["text"] for event in pieces) == whole["text"]
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["usage"] == whole["usage"]


def test_n_completions_with_a_seed_are_reproducible(client: httpx.Client) -> None:
    request = {"prompt": "My favourite colour is", "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 7}
    first = client.post("/complete", json=request).json()
    second = client.post("/complete", json=request).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]
    assert first["usage"]["completion_tokens"] <= 12


def test_raw_completion_on_an_instruct_model_is_allowed(client: httpx.Client) -> None:
    response = client.post("/complete", json={"model": INSTRUCT_MODEL, "prompt": "1, 2, 3,", "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == INSTRUCT_MODEL


def test_stop_sequences_end_generation(client: httpx.Client) -> None:
    response = client.post(
        "/complete", json={"prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": [","]}
    )
    body = response.json()
    assert body["finish_reason"] == "stop", body
    assert "," not in body["text"]
