"""A key's policy: which served models it may use (by name, by kind, or both), how its budget's periods
run, its usage book bounded and forgetting only what the store has."""

from __future__ import annotations

from datetime import UTC, date, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from service.core.key_policy import KeyPolicy, NewKey, Period, TokenBudget
from service.core.keys import KeyDirectory, as_row, from_row, new_key
from service.core.tenancy import key_id
from service.core.usage import UsageBook
from service.ops.settings import ModelKind

BASE = SimpleNamespace(name="gemma", kind=ModelKind.BASE)
CHAT = SimpleNamespace(name="smol", kind=ModelKind.INSTRUCT)
ADAPTER = SimpleNamespace(name="smol-support", kind=ModelKind.INSTRUCT)


def allowed(policy: KeyPolicy) -> list[str]:
    return [m.name for m in (BASE, CHAT, ADAPTER) if policy.allows(m)]  # type: ignore[arg-type]


def test_models_and_kinds_both_hold() -> None:
    assert allowed(KeyPolicy()) == ["gemma", "smol", "smol-support"]
    assert allowed(KeyPolicy(kinds=["instruct"])) == ["smol", "smol-support"]
    assert allowed(KeyPolicy(models=["smol-support"])) == ["smol-support"]  # an adapter, by name
    assert allowed(KeyPolicy(models=["gemma", "smol"], kinds=["base"])) == ["gemma"]


def test_a_refusal_names_the_rule() -> None:
    refusal = KeyPolicy(kinds=["instruct"]).refusal(BASE)  # type: ignore[arg-type]
    assert refusal is not None and refusal.status_code == 403 and refusal.code == "kind_not_allowed"
    assert "instruct models only; 'gemma' is a base model" in refusal.message and refusal.param == "model"
    refusal = KeyPolicy(models=["smol"]).refusal(ADAPTER)  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == "model_not_allowed"
    assert refusal.message.startswith("This API key may use only these models: smol;")


@pytest.mark.parametrize(
    "body",
    [{"name": ""}, {"name": "x", "kinds": ["chatty"]}, {"name": "x", "rate_limit": "often"},
     {"name": "x", "rate_limit": "0/second"}, {"name": "x", "rate_limit": "99999999999999999999/second"},
     {"name": "x", "rate_limit": "1/0second"}, {"name": "x", "rate_limit": "5/00 minutes"},
     {"name": "x", "rate_limit": "1 per 0 seconds"}, {"name": "x", "rate_limit": "1/second;2/minute"},
     {"name": "\u0000"}, {"name": "a\nb"},
     {"name": "x", "max_concurrent": 0}, {"name": "x", "token_budget": {"tokens": 10, "period": "week"}},
     {"name": "x", "models": ["no spaces please"]}, {"name": "x", "secret": "mine"}],
)  # fmt: skip
def test_a_bad_policy_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NewKey.model_validate(body)


def test_the_largest_rate_and_a_period_of_several_units_are_taken() -> None:
    assert NewKey.model_validate({"name": "x", "rate_limit": "1000000000000/second"}).rate_limit
    assert NewKey.model_validate({"name": "x", "rate_limit": "10 per minute"}).rate_limit == "10 per minute"
    key = NewKey.model_validate({"name": "büro 1", "rate_limit": "5/10 minutes"})
    assert key.rate_limit == "5/10 minutes"


def test_budget_periods_start_at_midnight_utc() -> None:
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    day, month, whole = (TokenBudget(tokens=1, period=p) for p in (Period.DAY, Period.MONTH, Period.NONE))
    assert day.resets_at(now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert month.resets_at(now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert whole.resets_at(now) is None and whole.bucket(now) == whole.bucket(now + 10**8)
    assert day.bucket(now + 120) == day.bucket(now) + 1 and month.bucket(now + 120) == month.bucket(now) + 1


def test_a_record_keeps_its_policy_and_never_its_secret() -> None:
    policy = KeyPolicy(kinds=["instruct"], rate_limit="60/minute", max_concurrent=2,
                       token_budget=TokenBudget(tokens=5000, period=Period.MONTH))  # fmt: skip
    secret, record = new_key("app", policy, datetime.now(UTC))
    row = as_row(record)
    assert secret not in str(row) and record.id == key_id(secret) and row["digest"].startswith(record.id)
    assert from_row(row) == record
    directory = KeyDirectory([record])
    assert directory.closed and directory.get(record.id) == record


def test_usage_is_bounded_and_forgotten_only_once_stored() -> None:
    dropped = []
    clock = [datetime(2026, 12, 5, 12, tzinfo=UTC).timestamp()]
    book = UsageBook(2, lambda: dropped.append(1), clock=lambda: clock[0])
    book.count("k1", "m", error=False)
    book.add_tokens("k1", "m", 10, 5)
    book.count("k2", "m", error=True)
    book.count("k3", "m", error=False)  # a third row: over the bound, dropped and counted
    assert len(dropped) == 1 and len(book.totals) == 2
    rows = book.unwritten("h")
    assert {(r["key_id"], r["requests"], r["errors"], r["tokens_in"]) for r in rows} == {
        ("k1", 1, 0, 10),
        ("k2", 1, 1, 0),
    }
    clock[0] += 2 * 86_400
    book.stored(rows[:1])  # two days later: what the store has whole goes, the rest waits
    assert list(book.totals) == [("k2", "m", date(2026, 12, 5))] and book.waiting == 1


def test_usage_counted_across_midnight_starts_the_new_day_s_row() -> None:
    """Today's rows are remembered per key and model; the next day's requests must not land in them."""
    clock = [datetime(2026, 12, 5, 23, 59, 59, tzinfo=UTC).timestamp()]
    book = UsageBook(10, lambda: None, clock=lambda: clock[0])
    book.count("k", "m", error=False)
    book.add_tokens("k", "m", 3, 4)
    clock[0] += 2  # 00:00:01 the next day
    book.count("k", "m", error=True)
    book.add_tokens("k", "m", 5, 6)
    assert book.totals == {
        ("k", "m", date(2026, 12, 5)): [1, 0, 3, 4],
        ("k", "m", date(2026, 12, 6)): [1, 1, 5, 6],
    }
