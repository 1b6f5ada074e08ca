"""What a request may make a real vLLM worker compute, and what a large answer costs on the way back:
`echo` on chat makes the worker compute prompt logprobs (vLLM's own rule, which the gateway budgets),
a batch's are summed, `logprob_token_ids` sets how many logprobs come back per token, and an answer
of megabytes passes through as the worker's bytes with its usage counted."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import INSTRUCT_MODEL, OPERATOR, Stack
from tests.promtext import delta, parse

VOCAB = 49_152  # SmolLM2's
BUDGET = 268_435_456  # GATEWAY_SCORING_BUDGET's default


def conversation(words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Repeat: " + "word " * words}]


def test_chat_echo_makes_the_worker_compute_prompt_logprobs(stack: Stack, client: httpx.Client) -> None:
    body = {"model": INSTRUCT_MODEL, "messages": conversation(3), "max_tokens": 1, "echo": True}
    direct = httpx.post(f"{stack.worker_url(INSTRUCT_MODEL)}/v1/chat/completions", json=body, timeout=120)
    through = client.post("/v1/chat/completions", json=body)
    assert direct.status_code == through.status_code == 200, through.text
    for answer in (direct.json(), through.json()):  # vLLM: prompt_logprobs = top_logprobs, 0 by default
        rows = answer["prompt_logprobs"]
        assert rows and rows[0] is None and all(row for row in rows[1:])


def test_a_batch_over_the_scoring_budget_with_echo_is_refused_before_the_worker(client: httpx.Client) -> None:
    # Three conversations of ~1,850 tokens each fit the 2,048-token context one by one; their prompt
    # logprobs together are over the default budget (5,461 SmolLM2 tokens).
    batch = {"model": INSTRUCT_MODEL, "messages": [conversation(1800)] * 3, "max_tokens": 1, "echo": True}
    refused = client.post("/v1/chat/completions/batch", json=batch)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "echo" and error["code"] == "scoring_budget_exceeded"
    assert f"at most {BUDGET // VOCAB:,} prompt tokens" in error["message"]
    one = client.post("/v1/chat/completions/batch", json={**batch, "messages": [conversation(1800)]})
    assert one.status_code == 200, one.text


def test_logprob_token_ids_set_the_logprobs_per_token_and_are_capped(client: httpx.Client) -> None:
    body = {"model": INSTRUCT_MODEL, "messages": conversation(3), "max_tokens": 2, "logprobs": True}
    listed = client.post("/v1/chat/completions", json={**body, "logprob_token_ids": list(range(100, 105))})
    assert listed.status_code == 200, listed.text
    content = listed.json()["choices"][0]["logprobs"]["content"]
    assert all(len(token["top_logprobs"]) >= 5 for token in content)  # one per listed id (and the sampled)
    over = client.post("/v1/chat/completions", json={**body, "logprob_token_ids": list(range(100, 121))})
    assert over.status_code == 400 and over.json()["error"]["param"] == "logprob_token_ids"


def test_an_answer_of_megabytes_passes_through_with_its_usage(stack: Stack, client: httpx.Client) -> None:
    # Prompt logprobs with 20 alternatives for each of ~1,500 prompt tokens: a few MB of JSON.
    body = {"model": INSTRUCT_MODEL, "messages": conversation(1500), "max_tokens": 1, "prompt_logprobs": 20}
    before = parse(client.get("/metrics", headers=OPERATOR).text)
    through = client.post("/v1/chat/completions", json=body)
    after = parse(client.get("/metrics", headers=OPERATOR).text)
    assert through.status_code == 200, through.text
    assert len(through.content) > 2_000_000
    answer = through.json()
    assert len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"] > 1500
    counted = delta(before, after, "gateway_prompt_tokens_total", model=INSTRUCT_MODEL)
    assert counted == answer["usage"]["prompt_tokens"]
    assert delta(before, after, "gateway_completion_tokens_total", model=INSTRUCT_MODEL) == 1
