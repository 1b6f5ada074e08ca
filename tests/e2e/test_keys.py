"""Keys managed at runtime against real vLLM workers, through the official `openai` client: kinds as
policy, a token budget reserved and settled with what the worker really reported (streamed, whole, and a
stream the client leaves), usage per key and model, revocation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.doc_examples import ADMIN_KEY
from tests.e2e.conftest import BASE_MODEL, INSTRUCT_MODEL
from tests.gateway_process import Stack

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def admin(admin_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admin_stack.url, headers=ADMIN, timeout=300) as http:
        yield http


def new_key(admin: httpx.Client, **policy: Any) -> dict[str, Any]:
    answer = admin.post("/keys", json={"name": "e2e", **policy})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


def client_of(stack: Stack, key: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key["key"], max_retries=0)


def test_an_instruct_key_is_refused_a_base_model_and_sees_only_instruct_ones(
    admin_stack: Stack, admin: httpx.Client
) -> None:
    key = new_key(admin, kinds=["instruct"])
    with client_of(admin_stack, key) as oai:
        assert [model.id for model in oai.models.list()] == [INSTRUCT_MODEL]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            oai.completions.create(model=BASE_MODEL, prompt="The sky is", max_tokens=4)
        assert refused.value.code == "kind_not_allowed" and BASE_MODEL in refused.value.message
        answer = oai.chat.completions.create(
            model=INSTRUCT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert answer.usage is not None and answer.usage.completion_tokens <= 4
    native = httpx.post(
        f"{admin_stack.url}/complete",
        json={"model": BASE_MODEL, "prompt": "The sky is", "max_tokens": 4},
        headers={"Authorization": f"Bearer {key['key']}"},
    )
    assert native.status_code == 403 and native.json()["error"]["code"] == "kind_not_allowed"


def test_a_budget_is_settled_with_what_the_worker_reported(admin_stack: Stack, admin: httpx.Client) -> None:
    key = new_key(admin, token_budget={"tokens": 2000, "period": "day"})
    reported = 0
    with client_of(admin_stack, key) as oai:
        whole = oai.completions.create(model=BASE_MODEL, prompt="The sky is", max_tokens=8, temperature=0)
        assert whole.usage is not None
        reported += whole.usage.total_tokens
        chunks = oai.chat.completions.create(
            model=INSTRUCT_MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
        assert len(usage) == 1
        reported += usage[0].total_tokens
        with pytest.raises(openai.RateLimitError) as refused:  # more than the whole budget
            oai.completions.create(model=BASE_MODEL, prompt="The sky is", max_tokens=1990)
        assert refused.value.code == "token_budget_exceeded"
    listed = next(k for k in admin.get("/keys").json()["data"] if k["id"] == key["id"])["token_budget"]
    assert listed["used"] == reported and listed["left"] <= 2000 - reported
    rows = admin.get("/usage", params={"key": key["id"], "period": "day"}).json()
    assert rows["totals"]["tokens_in"] + rows["totals"]["tokens_out"] == reported
    assert {row["model"] for row in rows["data"]} == {BASE_MODEL, INSTRUCT_MODEL}
    assert rows["totals"]["requests"] == 3 and rows["totals"]["errors"] == 1


def test_a_revoked_key_is_refused_at_once(admin_stack: Stack, admin: httpx.Client) -> None:
    key = new_key(admin)
    with client_of(admin_stack, key) as oai:
        assert oai.models.list().data
        assert admin.delete(f"/keys/{key['id']}").status_code == 200
        with pytest.raises(openai.AuthenticationError) as refused:
            oai.models.list()
    assert "revoked" in refused.value.message
