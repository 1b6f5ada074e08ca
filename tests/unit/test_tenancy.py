"""Who is calling and the cache salts derived for it: stable across processes, apart between keys,
shared within an operator's group, never chosen by a client; the fields that are the operator's."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from service.api.auth import ApiKeyMiddleware
from service.core import tenancy as tenancy_module
from service.core.protocol import V1CompletionRequest
from service.core.tenancy import (
    OPEN,
    Caller,
    Tenancy,
    accepts_salt,
    check_client_fields,
    check_stored_responses,
    key_id,
    splice_member,
    with_salt,
    worker_salt,
)
from service.errors import InvalidRequest
from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.pool import Capacity, ModelPool, Worker
from service.workers.routing import Router, RoutingConfig
from tests.helpers import call_asgi

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")
FORBIDDEN = "@/\\\x00"


def tenancy(keys: str, **settings: Any) -> Tenancy:
    return Tenancy.from_settings(Settings(api_keys=keys, models=[SPEC], **settings))  # type: ignore[arg-type]


def pool(fields: dict[str, list[str]] | None = None) -> ModelPool:
    worker = Worker("m", "http://w:1", up=True)
    if fields is not None:
        worker.facts["fields"] = {name: frozenset(names) for name, names in fields.items()}
    return ModelPool(SPEC, [worker], Capacity(), Router(RoutingConfig()))


def salt_of(callers: Tenancy, key: str) -> str:
    salt = callers.caller(key_id(key)).salt
    assert salt is not None
    return salt


async def test_the_key_id_is_the_one_the_auth_middleware_gives_the_request() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope["state"])

    guard = ApiKeyMiddleware(app, keys=["k1", "k2"])
    await call_asgi(guard, "POST", "/v1/completions", b"{}", {"authorization": "Bearer k2"})
    assert seen["api_key_id"] == key_id("k2") and len(key_id("k2")) == 32


def test_without_keys_nobody_is_told_apart() -> None:
    callers = tenancy("")
    assert callers.caller(None) is OPEN and OPEN.salt is None and OPEN.salt_for("mine") is None
    assert worker_salt(OPEN, pool(), "/v1/completions", "mine") is None


def test_each_key_has_its_own_salt_that_every_process_derives_alike() -> None:
    first, second = tenancy("alpha,beta"), tenancy("beta,alpha")  # two processes (or pods)
    a, b = salt_of(first, "alpha"), salt_of(first, "beta")
    assert a != b and salt_of(second, "alpha") == a and salt_of(second, "beta") == b
    assert len(a) == 64 and not set(FORBIDDEN) & set(a)  # within vLLM's rule for cache_salt
    # Unset secret: a key is its own secret, so adding or removing other keys changes nothing.
    assert salt_of(tenancy("alpha,gamma"), "alpha") == a
    assert salt_of(tenancy("alpha", cache_salt_secret="s3cret"), "alpha") != a
    assert salt_of(tenancy("alpha", cache_salt_secret="s3cret"), "alpha") == salt_of(
        tenancy("alpha,delta", cache_salt_secret="s3cret"), "alpha"
    )


def test_an_operators_group_shares_one_salt() -> None:
    groups = {"team": [key_id("alpha"), key_id("gamma")]}
    callers = tenancy("alpha,beta,gamma", cache_groups=groups)
    assert salt_of(callers, "alpha") == salt_of(callers, "gamma") != salt_of(callers, "beta")
    assert callers.caller(key_id("alpha")).cache_group == "group:team"
    assert callers.caller(key_id("beta")).cache_group == f"key:{key_id('beta')}"
    assert salt_of(callers, "beta") == salt_of(tenancy("alpha,beta,gamma"), "beta")


def test_a_request_without_a_known_key_id_is_still_kept_apart() -> None:
    callers = tenancy("alpha,beta")
    anonymous = callers.caller(None)
    assert anonymous.salt is not None
    assert anonymous.salt not in {salt_of(callers, "alpha"), salt_of(callers, "beta")}
    assert callers.caller("0" * 32) is anonymous


def test_a_clients_own_salt_partitions_its_cache_but_names_no_other() -> None:
    callers = tenancy("alpha,beta")
    alpha, beta = callers.caller(key_id("alpha")), callers.caller(key_id("beta"))
    mine = alpha.salt_for("conversation-1")
    assert mine == alpha.salt_for("conversation-1") and mine not in {alpha.salt, "conversation-1"}
    assert alpha.salt_for("conversation-2") != mine
    assert beta.salt_for("conversation-1") != mine
    assert beta.salt_for(alpha.salt) != alpha.salt  # knowing another's salt does not reach its cache


@pytest.mark.parametrize(
    ("salt", "says"),
    [("", "non-empty"), (7, "non-empty"), ("a/b", "must not contain"), ("x" * 129, "at most 128")],
)
def test_a_client_salt_vllm_would_refuse_is_refused_in_its_words(salt: object, says: str) -> None:
    caller = tenancy("alpha").caller(key_id("alpha"))
    with pytest.raises(InvalidRequest) as caught:
        check_client_fields(caller, {"cache_salt": salt})
    assert caught.value.param == "cache_salt" and says in caught.value.message
    check_client_fields(OPEN, {"cache_salt": salt})  # without keys the worker answers as vLLM does


def test_the_salt_is_spliced_into_the_clients_bytes_and_wins_over_its_own() -> None:
    raw = b'{"model": "m", "prompt": "x", "cache_salt": "client"}\n'
    spliced = splice_member(raw, "cache_salt", "gateway")
    assert spliced.startswith(raw.rstrip()[:-1])  # the client's bytes, untouched, then the member
    assert json.loads(spliced)["cache_salt"] == "gateway"  # vLLM's parser: the last duplicate wins
    extras = V1CompletionRequest.model_validate_json(spliced).model_extra or {}
    assert extras["cache_salt"] == "gateway"  # and the gateway's
    escaped = b'{"prompt": "x", "cache\\u005fsalt": "client"}'
    assert json.loads(splice_member(escaped, "cache_salt", "gateway"))["cache_salt"] == "gateway"
    assert json.loads(splice_member(b"{ }", "k", "v")) == {"k": "v"}
    for odd in ('quote " and \\ backslash', "tab\tnewline\n", "ünïcode", "\u2028"):
        assert json.loads(splice_member(b'{"a": 1}', "k", odd)) == {"a": 1, "k": odd}
    with pytest.raises(ValueError, match="not a JSON object"):
        splice_member(b'["x"]', "k", "v")


def test_no_salt_leaves_the_body_as_it_is() -> None:
    raw = b'{"prompt": "x"}'
    assert with_salt(raw, None) is raw
    body = {"prompt": "x"}
    assert with_salt(body, None) is body and with_salt(body, "s") == {"prompt": "x", "cache_salt": "s"}


def test_a_worker_without_cache_salt_gets_none_and_the_gateway_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenancy_module, "_warned", set())
    caller = tenancy("alpha").caller(key_id("alpha"))
    assert worker_salt(caller, pool(), "/v1/completions") == caller.salt  # no schema: sent
    knows = pool({"CompletionRequest": ["prompt", "cache_salt"]})
    assert worker_salt(caller, knows, "/v1/completions") == caller.salt
    old = pool({"CompletionRequest": ["prompt"], "ChatCompletionRequest": ["messages", "cache_salt"]})
    with caplog.at_level(logging.WARNING, logger="service.core.tenancy"):
        assert worker_salt(caller, old, "/v1/completions") is None
        assert not accepts_salt(old, "CompletionRequest")
        assert worker_salt(caller, old, "/v1/chat/completions") == caller.salt
    assert sum("takes no cache_salt" in record.message for record in caplog.records) == 1


@pytest.mark.parametrize("priority", [-5, 1, 2**40, "high", True])
def test_priority_is_the_operators(priority: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_client_fields(OPEN, {"priority": priority})
    assert caught.value.param == "priority" and "operator" in caught.value.message
    check_client_fields(Caller(may_set_priority=True), {"priority": priority})  # the per-key seam


def test_a_priority_that_asks_for_nothing_passes() -> None:
    check_client_fields(OPEN, {"priority": 0})
    check_client_fields(OPEN, {"priority": None})
    check_client_fields(OPEN, {})


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"previous_response_id": "resp_1"}, "previous_response_id"), ({"background": True}, "background")],
)
def test_stored_responses_are_refused_with_the_reason(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_stored_responses(fields)
    assert caught.value.param == param and "per API key" in caught.value.message
    check_stored_responses({"background": False, "previous_response_id": None, "store": False})


def test_groups_must_name_configured_keys_once() -> None:
    with pytest.raises(ValidationError, match="is the id of none of the api_keys"):
        Settings(api_keys="alpha", cache_groups={"team": ["f" * 32]})  # type: ignore[arg-type]
    twice = {"one": [key_id("alpha")], "two": [key_id("alpha")]}
    with pytest.raises(ValidationError, match="more than one group"):
        Settings(api_keys="alpha", cache_groups=twice)  # type: ignore[arg-type]
    assert Settings(worker_api_key="", cache_salt_secret="").worker_api_key is None  # type: ignore[arg-type]


def test_groups_and_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "alpha,beta")
    monkeypatch.setenv("GATEWAY_CACHE_GROUPS", json.dumps({"team": [key_id("alpha"), key_id("beta")]}))
    monkeypatch.setenv("GATEWAY_CACHE_SALT_SECRET", "s3cret")
    settings = Settings()
    callers = Tenancy.from_settings(settings)
    assert salt_of(callers, "alpha") == salt_of(callers, "beta")
    assert settings.cache_salt_secret is not None and "s3cret" not in repr(settings)
