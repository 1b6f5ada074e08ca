"""Keys managed at runtime, in the real app in front of the stand-in worker: the operator's workflow,
kinds and models as policy on every route, a token budget that cannot overshoot under concurrent streams
(two gateways sharing one store, as two processes or pods would), requests in progress and rates per
key, usage per key, model and day."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ops.settings import Settings
from tests.integration.conftest import running_gateway, standin_settings
from tests.integration.standin import Script
from tests.promtext import parse

ADMIN = {"Authorization": "Bearer admin-1"}
SYNC = 0.1  # GATEWAY_KEYS_SYNC_INTERVAL in these tests


def settings_for(url: str, database: Path, **overrides: Any) -> Settings:
    return standin_settings(
        url, admin_keys="admin-1", database_url=f"sqlite:///{database}", keys_sync_interval=SYNC, **overrides
    )


@contextlib.asynccontextmanager
async def gateways(
    url: str, database: Path, count: int = 1, **overrides: Any
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` gateways sharing one store (each its own app: as separate processes or pods are)."""
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for _ in range(count):
            _, http = await stack.enter_async_context(
                running_gateway(settings_for(url, database, **overrides))
            )
            clients.append(http)
        yield clients


async def new_key(http: httpx.AsyncClient, **policy: Any) -> tuple[str, dict[str, str]]:
    answer = await http.post("/keys", json={"name": "app", **policy}, headers=ADMIN)
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], {"Authorization": f"Bearer {answer.json()['key']}"}


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **extra}


async def answered_within(
    http: httpx.AsyncClient, headers: dict[str, str], status: int, seconds: float
) -> bool:
    """Whether a chat request gets `status` within `seconds` (asked again every 20 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (await http.post("/v1/chat/completions", json=chat(), headers=headers)).status_code == status:
            return True
        await asyncio.sleep(0.02)
    return False


async def learns_of_keys(http: httpx.AsyncClient) -> None:
    """Wait until a gateway that held no key learns of one (until then it serves without a key, and
    would charge no key), as its next look at the store does."""
    deadline = time.monotonic() + 10
    while (await http.get("/v1/models")).status_code != 401:
        assert time.monotonic() < deadline, "the gateway never learnt of the store's keys"
        await asyncio.sleep(0.02)


async def test_the_operators_workflow(standin_url: str, tmp_path: Path) -> None:
    database = tmp_path / "gateway.db"
    async with gateways(standin_url, database, count=2) as (first, second):
        created = await first.post(
            "/keys", json={"name": "support-bot", "kinds": ["instruct"]}, headers=ADMIN
        )
        assert created.status_code == 201
        body = created.json()
        assert list(body)[:2] == ["id", "key"] and body["prefix"] == body["key"][:12]
        secret = body["key"]
        client = {"Authorization": f"Bearer {secret}"}
        assert (await first.post("/v1/chat/completions", json=chat(), headers=client)).status_code == 200
        # The other process learns of the key at its next look (until then it was open to all).
        await learns_of_keys(second)
        assert await answered_within(second, client, 200, 5 * SYNC + 1)
        listed = (await second.get("/keys", headers=ADMIN)).json()["data"]
        assert [(k["id"], k["name"]) for k in listed] == [
            (body["id"], "support-bot")
        ] and "key" not in listed[0]
        assert (await first.get("/keys", headers=client)).status_code == 401  # a client key is no admin key

        revoked = await first.delete("/keys/support-bot", headers=ADMIN)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        refused = await first.post("/v1/chat/completions", json=chat(), headers=client)
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]  # at once here
        assert await answered_within(second, client, 401, 5 * SYNC + 1)  # and within a sync in the other one
        assert (await first.delete("/keys/nobody", headers=ADMIN)).json()["error"]["code"] == "key_not_found"
    with sqlite3.connect(database) as db:  # the secret is nowhere; its SHA-256 is what is kept
        dump = "\n".join(db.iterdump())
    assert secret not in dump and hashlib.sha256(secret.encode()).hexdigest() in dump


async def test_once_a_key_exists_every_client_route_needs_one(standin_url: str, tmp_path: Path) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200  # open: no keys yet
        await new_key(http)
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 401
        assert (await http.get("/health")).status_code == 200


async def test_kinds_and_models_are_policy_on_every_route(standin_url: str, tmp_path: Path) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        _, instruct = await new_key(http, kinds=["instruct"])
        for path, body in [("/complete", {"prompt": "The capital of France is"}),
                           ("/v1/completions", {"model": "base", "prompt": "x"}),
                           ("/complete", {"prompt": "x", "continuation": " y"}),
                           ("/tokenize", {"model": "base", "prompt": "x"})]:  # fmt: skip
            refused = await http.post(path, json=body, headers=instruct)
            assert refused.status_code == 403, (path, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "kind_not_allowed" and error["param"] == "model"
            assert "instruct models only; 'base' is a base model" in error["message"]
        assert (await http.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]},
                                headers=instruct)).status_code == 200  # fmt: skip
        assert (await http.post("/v1/completions", json={"model": "chat", "prompt": "x"},
                                headers=instruct)).status_code == 200  # fmt: skip
        listed = (await http.get("/v1/models", headers=instruct)).json()["data"]
        assert [m["id"] for m in listed] == ["chat"]
        assert (
            await http.get("/v1/models/base", headers=instruct)
        ).status_code == 404  # hidden, as in the list

        _, base = await new_key(http, kinds=["base"])
        for path, body in [("/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/chat/completions", chat()),
                           ("/v1/completions", {"model": "chat", "prompt": "x"})]:  # fmt: skip
            refused = await http.post(path, json=body, headers=base)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "kind_not_allowed", path
        scored = await http.post("/complete", json={"prompt": "x", "continuation": " y"}, headers=base)
        assert scored.status_code != 403  # base includes scoring

        _, named = await new_key(http, models=["chat"])
        refused = await http.post("/v1/completions", json={"model": "base", "prompt": "x"}, headers=named)
        assert refused.json()["error"]["code"] == "model_not_allowed"
        bad = await http.post("/keys", json={"name": "x", "models": ["nope"]}, headers=ADMIN)
        assert bad.status_code == 400 and "served models: base, chat" in bad.json()["error"]["message"]
        never = await http.post("/keys", json={"name": "x", "models": ["base"], "kinds": ["instruct"]},
                                headers=ADMIN)  # fmt: skip
        assert never.status_code == 400 and "could never use it" in never.json()["error"]["message"]


async def stream_tokens(
    http: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> tuple[int, int]:
    """(status, tokens the answer's usage reports) of one streamed request."""
    async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, 0
        used = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = httpx.Response(200, content=line[6:]).json().get("usage") or {}
                used = usage.get("total_tokens") or used
        return 200, used


async def test_a_budget_never_overshoots_under_concurrent_streams_in_two_gateways(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    script.tokens = ["x"] * 20  # every stream uses all it may generate: the reservation is what it uses
    script.token_delay = 0.01
    budget = 600
    async with gateways(standin_url, tmp_path / "gateway.db", count=2) as clients:
        key_id, headers = await new_key(clients[0], token_budget={"tokens": budget, "period": "day"})
        await learns_of_keys(clients[1])
        body = {"model": "base", "prompt": "hi", "max_tokens": 20, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        burst = await asyncio.gather(*(stream_tokens(clients[i % 2], headers, body) for i in range(60)))
        served = [used for status, used in burst if status == 200]
        assert {status for status, _ in burst} == {200, 429}
        whole = {"model": "base", "prompt": "hi", "max_tokens": 20}
        for attempt in range(40):  # then one at a time, alternating, until the budget is spent
            answer = await clients[attempt % 2].post("/v1/completions", json=whole, headers=headers)
            if answer.status_code != 200:
                break
            served.append(answer.json()["usage"]["total_tokens"])
        refused = answer
        await asyncio.sleep(3 * SYNC)  # the other gateway's usage is written at its next exchange
        usage = (await clients[0].get("/usage", params={"key": key_id}, headers=ADMIN)).json()
        listed = (await clients[1].get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
    assert budget - 21 < sum(served) <= budget, (len(served), sum(served))
    assert usage["totals"]["tokens_in"] + usage["totals"]["tokens_out"] == sum(served)
    assert listed["used"] == sum(served) and listed["left"] == budget - sum(served)
    error = refused.json()["error"]
    assert refused.status_code == 429 and error["code"] == "token_budget_exceeded"
    numbers = {name: int(refused.headers[f"x-token-budget-{name}"]) for name in ("used", "reserved", "left")}
    # At the refusal, `reserved` also holds what a process was granted and not yet spent (its cushion,
    # or what a request reserved beyond what it used): the numbers add up to the budget, none is lost.
    assert numbers["used"] + numbers["reserved"] + numbers["left"] == budget
    assert numbers["used"] <= sum(served) <= numbers["used"] + numbers["reserved"]
    assert f"{numbers['used']} used, {numbers['reserved']} reserved" in error["message"]
    assert "starts again at" in error["message"] and refused.headers["x-token-budget-reset"].endswith(
        "T00:00:00Z"
    )
    assert int(refused.headers["retry-after"]) >= 1


async def test_a_stream_the_client_leaves_is_settled(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    script.tokens = ["x"] * 50
    script.token_delay = 0.05
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        key_id, headers = await new_key(http, token_budget={"tokens": 100})
        body = {"model": "base", "prompt": "hi", "max_tokens": 90, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            lines = response.aiter_lines()
            for _ in range(3):
                await anext(lines)  # three events, then the client leaves
        await asyncio.sleep(0.3)
        # Charged what the gateway saw (its prompt count and the events relayed), not the 92 reserved.
        listed = (await http.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
        assert 3 <= listed["used"] < 20
        script.token_delay = 0.0
        again = await http.post("/v1/completions", json={**body, "stream": False}, headers=headers)
        assert again.status_code == 200, again.text  # the reservation came back
        usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
        assert usage["requests"] == 2


async def test_requests_in_progress_are_capped_across_gateways(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    script.first_token_delay = 0.5
    async with gateways(standin_url, tmp_path / "gateway.db", count=2) as clients:
        _, headers = await new_key(clients[0], max_concurrent=2)
        await learns_of_keys(clients[1])
        body = chat(stream=False)
        answers = await asyncio.gather(
            *(clients[i % 2].post("/v1/chat/completions", json=body, headers=headers) for i in range(6))
        )
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200, 200, 429, 429, 429, 429], statuses
        refused = next(answer for answer in answers if answer.status_code == 429)
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert script.most_in_flight <= 2
        script.first_token_delay = 0.0
        assert (await clients[1].post("/v1/chat/completions", json=body, headers=headers)).status_code == 200


async def test_a_keys_rate_is_its_own(standin_url: str, tmp_path: Path) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db", rate_limit="100/minute") as (http,):
        _, slow = await new_key(http, rate_limit="3/minute")
        _, other = await new_key(http)  # no rate of its own: GATEWAY_RATE_LIMIT
        statuses = [(await http.get("/v1/models", headers=slow)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = await http.get("/v1/models", headers=slow)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 61
        assert all([(await http.get("/v1/models", headers=other)).status_code == 200 for _ in range(5)])


async def test_usage_per_key_model_and_day(standin_url: str, script: Script, tmp_path: Path) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db", api_keys="static-1") as (http,):
        key_id, headers = await new_key(http)
        static = {"Authorization": "Bearer static-1"}
        assert (await http.post("/v1/chat/completions", json=chat(), headers=headers)).status_code == 200
        assert (await http.post("/v1/completions", json={"model": "base", "prompt": [1, 2, 3]},
                                headers=headers)).status_code == 200  # fmt: skip
        assert (await http.post("/v1/completions", json={"model": "nope", "prompt": "x"},
                                headers=headers)).status_code == 404  # fmt: skip
        assert (await http.post("/v1/chat/completions", json=chat(), headers=static)).status_code == 200
        mine = (await http.get("/usage", params={"key": key_id, "period": "day"}, headers=ADMIN)).json()
        everyone = (await http.get("/usage", params={"period": "all"}, headers=ADMIN)).json()
        bad = await http.get("/usage", params={"period": "last week"}, headers=ADMIN)
    rows = {(row["model"], row["requests"], row["errors"], row["tokens_in"], row["tokens_out"])
            for row in mine["data"]}  # fmt: skip
    assert rows == {("chat", 1, 0, 1, 4), ("base", 1, 0, 3, 4), ("unknown", 1, 1, 0, 0)}
    assert mine["totals"] == {"requests": 3, "errors": 1, "tokens_in": 4, "tokens_out": 8}
    static_rows = [
        row for row in everyone["data"] if row["key_id"] == hashlib.sha256(b"static-1").hexdigest()[:32]
    ]
    assert [(row["name"], row["requests"]) for row in static_rows] == [
        (None, 1)
    ]  # GATEWAY_API_KEYS count too
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "period"


async def test_a_failed_over_request_is_charged_once(script: Script, tmp_path: Path) -> None:
    from tests.integration.conftest import extra_standin, first_replica_first

    async with extra_standin() as (broken, broken_url), extra_standin() as (_, good_url):
        broken.mode = "fail"
        settings = settings_for(broken_url, tmp_path / "gateway.db")
        replicas = [m.model_copy(update={"urls": [broken_url, good_url]}) for m in settings.models]
        settings = settings.model_copy(update={"models": replicas})
        async with running_gateway(settings) as (app, http):
            key_id, headers = await new_key(http, token_budget={"tokens": 10_000})
            with first_replica_first(app.state.gateway.pools["chat"]):
                answer = await http.post("/v1/chat/completions", json=chat(), headers=headers)
            assert answer.status_code == 200 and broken.bodies  # the broken one was tried first
            usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
    assert (usage["requests"], usage["tokens_in"] + usage["tokens_out"]) == (
        1,
        answer.json()["usage"]["total_tokens"],
    )


@pytest.mark.parametrize("path", ["/keys", "/usage"])
async def test_operator_routes_take_admin_keys_only(standin_url: str, tmp_path: Path, path: str) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        assert (await http.get(path)).status_code == 401
        assert (await http.get(path, headers=ADMIN)).status_code == 200


async def test_the_cli_manages_keys_of_a_running_gateway(
    standin_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        where = ["--url", str(http.base_url), "--admin-key", "admin-1"]

        async def cli(*argv: str) -> tuple[int, str, str]:
            code = await asyncio.to_thread(main, [*argv, *where])
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        code, out, _ = await cli("keys", "create", "--name", "cli-app", "--kinds", "instruct",
                                 "--token-budget", "100000/day", "--max-concurrent", "4")  # fmt: skip
        created = json.loads(out)
        assert code == 0 and created["kinds"] == ["instruct"] and created["token_budget"]["tokens"] == 100000
        code, out, _ = await cli("keys", "create", "--name", "script", "--secret-only")
        secret = out.strip()
        assert code == 0 and secret.startswith("sk-gw-") and "\n" not in secret
        client = {"Authorization": f"Bearer {created['key']}"}
        assert (await http.post("/v1/chat/completions", json=chat(), headers=client)).status_code == 200
        code, out, _ = await cli("keys", "list")
        listed = json.loads(out)["data"]
        assert [k["name"] for k in listed] == ["cli-app", "script"] and listed[0]["token_budget"]["used"] > 0
        code, out, _ = await cli("keys", "usage", "--key", "cli-app", "--period", "day")
        assert json.loads(out)["totals"]["requests"] == 1
        code, out, _ = await cli("keys", "revoke", "cli-app")
        assert code == 0 and json.loads(out)["revoked_at"]
        code, _, err = await cli("keys", "revoke", "nobody")
        assert (
            code == 1
            and err.strip()
            == "llm-gateway: error: 404: No API key has the id or name 'nobody'; GET /keys lists them."
        )


async def test_per_key_prometheus_series_count_and_go_with_the_key(standin_url: str, tmp_path: Path) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        key_id, headers = await new_key(http, kinds=["instruct"])
        served = await http.post("/v1/chat/completions", json=chat(max_tokens=5), headers=headers)
        assert served.status_code == 200
        refused = await http.post(
            "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}, headers=headers
        )
        assert refused.status_code == 403
        samples = parse((await http.get("/metrics", headers=ADMIN)).text)
        usage = served.json()["usage"]

        def series(metric: str, **labels: str) -> float:
            return samples.get((metric, frozenset({"key": key_id, **labels}.items())), 0.0)

        assert series("gateway_key_requests_total") == 2 and series("gateway_key_errors_total") == 1
        assert series("gateway_key_tokens_total", direction="in") == usage["prompt_tokens"]
        assert series("gateway_key_tokens_total", direction="out") == usage["completion_tokens"]
        assert series("gateway_key_refusals_total", reason="kind") == 1
        assert series("gateway_key_info", name="app") == 1
        assert (await http.delete(f"/keys/{key_id}", headers=ADMIN)).status_code == 200
        after = parse((await http.get("/metrics", headers=ADMIN)).text)
    assert not [name for name, labels in after if ("key", key_id) in labels]  # bounded by the live keys


async def test_a_prompt_reserved_at_its_bound_is_settled_with_the_workers_count(
    standin_url: str, tmp_path: Path
) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        _, headers = await new_key(http, token_budget={"tokens": 10**6, "period": "day"})
        body = {"model": "base", "prompt": "hello there " * 40, "max_tokens": 5}
        used = 0
        for _ in range(5):  # the first counts its prompt; then the process holds plenty: bounds
            answer = await http.post("/v1/completions", json=body, headers=headers)
            assert answer.status_code == 200
            used += answer.json()["usage"]["total_tokens"]
        listed = (await http.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
    assert listed["used"] == used and used < 5 * (len(body["prompt"]) + 5)


@pytest.mark.parametrize(
    ("path", "asked"),
    [("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": -1_000_000_000}),
     ("/v1/chat/completions", {**chat(), "max_completion_tokens": -1_000_000}),
     ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 5, "n": -3})],
)  # fmt: skip
async def test_a_value_the_worker_refuses_reserves_no_less_than_nothing(
    standin_url: str, script: Script, tmp_path: Path, path: str, asked: dict[str, Any]
) -> None:
    """A negative max_tokens (or n) reserved a negative amount while it waited: the key's other requests
    then ran far past its budget, and the ledger said a billion tokens were left (review of issue 22)."""
    script.tokens = ["x"] * 10
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        _, headers = await new_key(http, token_budget={"tokens": 60, "period": "day"})
        await http.post(path, json=asked, headers=headers)  # the stand-in answers; vLLM would refuse it
        listed = (await http.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
        assert listed["reserved"] >= 0 and listed["left"] <= 60, listed
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 40}
        answers = await asyncio.gather(
            *(http.post("/v1/completions", json=body, headers=headers) for _ in range(6))
        )
        served = sum(
            answer.json()["usage"]["total_tokens"] for answer in answers if answer.status_code == 200
        )
        listed = (await http.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
    assert listed["used"] <= 60 and served <= 60, (served, listed)


async def test_a_batch_with_an_empty_prompt_is_charged_and_counted(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    """["text", ""] went to the worker without a charge: nothing reserved, nothing counted."""
    script.tokens = ["x"] * 10
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        key_id, headers = await new_key(http, token_budget={"tokens": 50, "period": "day"})
        body = {"model": "base", "prompt": ["Once upon a time", ""], "max_tokens": 200, "n": 2}
        refused = await http.post("/v1/completions", json=body, headers=headers)
        assert refused.status_code == 429, refused.text
        small = {**body, "max_tokens": 5}
        answered = await http.post("/v1/completions", json=small, headers=headers)
        assert answered.status_code == 200, answered.text
        usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
    assert usage["tokens_out"] > 0 and usage["requests"] >= 1, usage


@pytest.mark.parametrize(
    ("path", "empty"),
    [("/v1/completions", {"prompt": ""}), ("/v1/completions", {"prompt": []}), ("/v1/completions", {}),
     ("/v1/chat/completions", {"messages": []})],
)  # fmt: skip
async def test_an_empty_prompt_is_charged_and_counted(
    standin_url: str, script: Script, tmp_path: Path, path: str, empty: dict[str, Any]
) -> None:
    """An empty prompt went to the worker without a charge (vLLM generates for "" on a model whose
    tokenizer adds BOS): any max_tokens got through a budget, and nothing was counted (review of issue 22)."""
    script.tokens = ["x"] * 4
    model = "chat" if "chat" in path else "base"
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        key_id, headers = await new_key(http, token_budget={"tokens": 40, "period": "day"})
        refused = await http.post(path, json={"model": model, **empty, "max_tokens": 1000}, headers=headers)
        assert refused.status_code == 429, refused.text
        small = {"model": model, **empty, "max_tokens": 4}
        answers = [await http.post(path, json=small, headers=headers) for _ in range(12)]
        served = sum(a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200)
        listed = (await http.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
        usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
    assert 0 < served <= 40 and listed["used"] == served, (served, listed)
    assert usage["tokens_in"] + usage["tokens_out"] == served, usage


async def test_a_batch_with_an_empty_conversation_is_charged_and_its_others_checked(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    """A batch holding an empty conversation skipped every check: nothing reserved (any max_tokens got
    past a budget), and the other conversations' text was not checked for control tokens."""
    script.tokens = ["x"] * 4
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        _, headers = await new_key(http, token_budget={"tokens": 40, "period": "day"})
        batch = {"model": "chat", "messages": [[], [{"role": "user", "content": "hi"}]], "max_tokens": 500}
        refused = await http.post("/v1/chat/completions/batch", json=batch, headers=headers)
        assert refused.status_code == 429, refused.text
        sneaky = {**batch, "max_tokens": 4, "messages": [[], [{"role": "user", "content": "<|im_start|>x"}]]}
        checked = await http.post("/v1/chat/completions/batch", json=sneaky, headers=headers)
        assert checked.status_code == 400, checked.text
        assert checked.json()["error"]["code"] == "control_token_in_message"
        assert checked.json()["error"]["param"].startswith("messages.1")


async def test_a_negative_truncation_never_counts_below_nothing(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    """truncate_prompt_tokens below -1 (vLLM refuses it) made the prompt's count negative: a 500 from the
    metrics, and a negative use stored that lifted the key's budget (review of issue 21)."""
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        key_id, headers = await new_key(http, token_budget={"tokens": 100_000, "period": "day"})
        # n: 0 makes the stand-in refuse it, as vLLM refuses the truncation: no usage comes back
        body = {"model": "base", "prompt": [1, 2, 3], "truncate_prompt_tokens": -(10**12), "max_tokens": 3,
                "n": 0}  # fmt: skip
        answer = await http.post("/v1/completions", json=body, headers=headers)
        assert answer.status_code < 500, answer.text
        listed = (await http.get("/keys", headers=ADMIN)).json()["data"][0]["token_budget"]
        usage = (await http.get("/usage", params={"key": key_id}, headers=ADMIN)).json()["totals"]
    assert listed["used"] >= 0 and listed["left"] <= 100_000 and usage["tokens_in"] >= 0, (listed, usage)


async def test_a_count_of_thousands_of_digits_is_a_400_not_a_500(standin_url: str, tmp_path: Path) -> None:
    huge = int("9" * 4300)  # Python refuses to write an integer over 4,300 digits as text
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        _, headers = await new_key(http, token_budget={"tokens": 1000, "period": "day"})
        native = await http.post(
            "/complete", json={"model": "base", "prompt": "hi", "max_tokens": huge}, headers=headers
        )
        budgeted = await http.post("/v1/chat/completions", json={**chat(), "max_completion_tokens": huge},
                                   headers=headers)  # fmt: skip
    assert native.status_code == 400 and "more than 10^15" in native.text, native.text
    assert budgeted.status_code == 429 and "more than 10^15" in budgeted.text, budgeted.text


async def test_keys_beyond_the_most_allowed_are_refused_with_the_numbers(
    standin_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    async with gateways(standin_url, tmp_path / "gateway.db", count=2, max_keys=2) as (first, second):
        kept, _ = await new_key(first)
        await new_key(second)  # live keys are counted in the store, whichever process creates them
        refused = await first.post("/keys", json={"name": "third"}, headers=ADMIN)
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "too_many_keys" and error["type"] == "invalid_request_error"
        assert "already has 2 live API keys, the most it allows (GATEWAY_MAX_KEYS = 2)" in error["message"]
        where = ["--url", str(second.base_url), "--admin-key", "admin-1"]
        code = await asyncio.to_thread(main, ["keys", "create", "--name", "cli", *where])
        assert code == 1 and "409: This gateway already has 2 live API keys" in capsys.readouterr().err
        assert (await first.delete(f"/keys/{kept}", headers=ADMIN)).status_code == 200
        await new_key(second)  # a revoked key leaves room
        listed = (await first.get("/keys", params={"revoked": "true"}, headers=ADMIN)).json()["data"]
        assert len(listed) == 3 and sum(key["revoked_at"] is None for key in listed) == 2


async def test_a_request_without_a_model_defaults_within_the_keys_policy(
    standin_url: str, tmp_path: Path
) -> None:
    async with gateways(standin_url, tmp_path / "gateway.db") as (http,):
        _, instruct = await new_key(http, kinds=["instruct"])
        # Endpoints any model serves take the first model the key may use, not the gateway's default.
        for path, body in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1, 2]}),
                           ("/v1/completions", {"prompt": "x", "max_tokens": 2})]:  # fmt: skip
            answer = await http.post(path, json=body, headers=instruct)
            assert answer.status_code == 200, (path, answer.text)
        assert (await http.get("/tokenizer_info", headers=instruct)).status_code == 200
        completed = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                    headers=instruct)  # fmt: skip
        assert completed.json()["model"] == "chat"
        # An endpoint of one kind refuses with the rule when the key may use none of that kind.
        refused = await http.post("/complete", json={"prompt": "x"}, headers=instruct)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "kind_not_allowed"

        _, base = await new_key(http, models=["base"])
        chat_refused = await http.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hi"}]}, headers=base)  # fmt: skip
        assert chat_refused.status_code == 403 and chat_refused.json()["error"]["code"] == "model_not_allowed"
        tokenized = await http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                                    headers=base)  # fmt: skip
        assert tokenized.status_code == 403 and "may use only these models: base" in tokenized.text

        _, second = await new_key(http, models=["chat"])
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                headers=second)).json()["model"] == "chat"  # fmt: skip
