"""A runtime key's limits in one process: what it holds is spent in memory; a request that needs more
waits for an exchange; refusals carry the numbers; cushions and slots are given back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from service.core.allowances import SLOT_LINGER_SECONDS, Allowance, Resource
from service.core.key_limits import Charge, KeyLimits, most_tokens
from service.core.key_policy import KeyPolicy, Period, TokenBudget
from service.core.keys import StoredKey
from service.core.tenancy import Caller
from service.errors import BudgetExceeded, LimitsUnavailable, RateLimited, TooManyInFlight
from service.store.ledger import Outcome

NOON = datetime(2026, 12, 5, 12, 0, tzinfo=UTC).timestamp()


class FakeStore:
    """Grants from one limit, as the ledger would for a single process (the ledger has its own tests)."""

    def __init__(self, limits: KeyLimits, free: int, reachable: bool = True) -> None:
        self.limits, self.free, self.reachable, self.plans = limits, free, reachable, []

    async def ask(self, _allowance: Allowance) -> bool:
        if not self.reachable:
            return False
        for allowance, plan in self.limits.plans():
            self.plans.append(plan)
            granted = min(plan.ask, self.free) if plan.ask and self.free >= plan.need else 0
            self.free -= granted
            held = plan.held + granted
            allowance.applied(plan, Outcome(granted, granted, held, 50, held, ((1, 5),)))
        return True


def limits_with(free: int, reachable: bool = True, now: float = NOON) -> tuple[KeyLimits, FakeStore]:
    store: list[FakeStore] = []
    limits = KeyLimits(lambda allowance: store[0].ask(allowance), wait_seconds=1, clock=lambda: now)
    store.append(FakeStore(limits, free, reachable))
    return limits, store[0]


def key(**policy: Any) -> StoredKey:
    return StoredKey("k" * 32, b"d", "sk-gw-x", "k", KeyPolicy(**policy), datetime.now(UTC))


def charge_of(most: int, tokens: int = 1000, period: Period = Period.DAY) -> Charge:
    policy = KeyPolicy(token_budget=TokenBudget(tokens=tokens, period=period))
    return Charge(Caller("k" * 32, policy=policy), "m", 10, most)


def test_the_most_a_request_may_use() -> None:
    assert most_tokens([10], 5, 1, 100) == 15
    assert most_tokens([10, 20], 5, 2, 100) == 10 + 20 + 2 * 2 * 5  # each prompt once, n completions each
    assert most_tokens([10], None, 1, 100) == 100  # vLLM's default: the rest of the context
    assert most_tokens([10], None, 3, 100) == 10 + 3 * 90
    assert most_tokens(None, None, 2, 100) == 200 and most_tokens(None, 30, 1, 100) == 100


async def test_a_budget_is_reserved_then_settled_with_what_was_used() -> None:
    limits, store = limits_with(free=1000)
    first = charge_of(300)
    await limits.reserve(first)
    allowance = limits.allowances[("k" * 32, Resource.TOKENS)]
    assert first.reserved == 300 and allowance.pending == 300 and allowance.held >= 300
    asked = len(store.plans)
    await limits.reserve(charge_of(10))  # within the cushion it was granted: no exchange
    assert len(store.plans) == asked
    limits.settle(first, 120)
    assert allowance.pending == 10 and allowance.spent == {int(NOON // 86400): 120}


async def test_over_the_budget_is_a_429_with_the_numbers() -> None:
    limits, _ = limits_with(free=100)
    with pytest.raises(BudgetExceeded) as refused:
        await limits.reserve(charge_of(300))
    error = refused.value
    assert error.status_code == 429 and error.code == "token_budget_exceeded"
    assert "1,000 tokens per day: 50 used" in error.message and "up to 300 tokens" in error.message
    assert error.headers is not None and error.headers["X-Token-Budget-Used"] == "50"
    assert error.headers["X-Token-Budget-Reset"] == "2026-12-06T00:00:00Z"
    assert error.headers["Retry-After"] == "1"  # 300 fits once reservations are settled


async def test_a_request_bigger_than_the_whole_budget_is_told_so() -> None:
    limits, store = limits_with(free=1000)
    with pytest.raises(BudgetExceeded, match="more than the whole budget"):
        await limits.reserve(charge_of(2000))
    assert store.plans == []


async def test_without_the_store_only_what_is_held_is_served() -> None:
    limits, store = limits_with(free=1000)
    await limits.reserve(charge_of(100))
    store.reachable = False
    allowance = limits.allowances[("k" * 32, Resource.TOKENS)]
    while allowance.available >= 100:
        await limits.reserve(charge_of(100))
    with pytest.raises(LimitsUnavailable):
        await limits.reserve(charge_of(100))


async def test_a_rate_counts_each_request_and_refuses_with_retry_after() -> None:
    limits, store = limits_with(free=3)
    rated = key(rate_limit="3/minute")
    for _ in range(3):
        await limits.hit(rated)
    with pytest.raises(RateLimited) as refused:
        await limits.hit(rated)
    assert refused.value.headers is not None and int(refused.value.headers["Retry-After"]) >= 1
    asked = len(store.plans)
    with pytest.raises(RateLimited):
        await limits.hit(rated)  # refused again at once, without asking the store
    assert len(store.plans) == asked


async def test_slots_cap_requests_in_progress_and_are_given_back_when_others_want_them() -> None:
    now = [NOON]
    limits, _ = limits_with(free=3)
    limits.clock = lambda: now[0]
    capped = key(max_concurrent=3)
    first, second = await limits.hold_slot(capped), await limits.hold_slot(capped)
    limits.release_slot(first)
    assert first.plan(now[0], None) is None  # just released: kept for the key's next request
    now[0] += SLOT_LINGER_SECONDS * 2
    assert first.plan(now[0], None) is None and first.held == 2  # one in use, one spare: no store call
    first.contended_until = now[0] + 5  # another process was refused a slot of this key
    plan = first.plan(now[0], None)
    assert plan is not None and plan.held == 1 and second.pending == 1  # only what is in use is kept


async def test_a_concurrency_cap_refuses_the_one_over() -> None:
    limits, _ = limits_with(free=2)
    capped = key(max_concurrent=2)
    await limits.hold_slot(capped)
    await limits.hold_slot(capped)
    with pytest.raises(TooManyInFlight):
        await limits.hold_slot(capped)


def test_a_cushion_is_kept_while_used_and_given_back_when_wanted_or_idle() -> None:
    allowance = Allowance("k", Resource.TOKENS, 8000, held=5000, pending=100, last_taken=NOON)
    allowance.demand = 400
    allowance.next_period()
    plan = allowance.plan(NOON, 0)
    assert plan is not None and plan.held == 100 + 1000  # open requests plus an eighth of the limit
    assert allowance.plan(NOON, 0) is not None  # the store has not taken it yet: told again
    allowance.applied(plan, Outcome(0, 0, 1100))
    assert allowance.plan(NOON, 0) is None  # nothing changed since the store took it
    allowance.contended_until = NOON + 5
    plan = allowance.plan(NOON, 0)
    assert plan is not None and plan.held == 100 + 400  # wanted elsewhere: the last period's demand
    allowance.failed()  # that exchange surely did not reach the store: it still holds them
    assert allowance.held == 1100
    plan = allowance.plan(NOON + 60, 0)
    assert plan is not None and plan.held == 100  # unused for a minute: only what open requests hold


def test_slots_kept_follow_the_most_in_use_lately_and_one_more() -> None:
    slots = Allowance("k", Resource.SLOTS, 100, held=40, last_taken=NOON)
    for _ in range(32):  # 32 requests in progress at once (a client with 32 connections)
        assert slots.take(1, NOON)
    for _ in range(31):
        slots.give(1, NOON)
    slots.next_period()
    later = NOON + SLOT_LINGER_SECONDS * 2
    plan = slots.plan(later, None)
    # One open now, but 32 were lately: 33 kept, so the client's next burst needs no exchange.
    assert plan is not None and plan.held == 33
    slots.applied(plan, Outcome(0, 0, 33))
    slots.next_period()  # a whole period with at most one in use: the spare slots go back
    plan = slots.plan(later, None)
    assert plan is not None and plan.held == 2


async def test_what_others_took_before_a_waiting_request_resumed_is_asked_for_again() -> None:
    limits, store = limits_with(free=10)
    stolen = []

    async def ask_then_others_take(allowance: Allowance) -> bool:
        answer = await store.ask(allowance)
        if not stolen:  # requests that did not wait take all that was granted, the first time
            while allowance.take(1, NOON):
                stolen.append(1)
        return answer

    limits.ask = ask_then_others_take
    slot = await limits.hold_slot(key(max_concurrent=10))  # not a 429: the store had room
    assert stolen and slot.pending == len(stolen) + 1 and len(store.plans) == 2


async def test_a_prompt_is_charged_its_bound_only_while_plenty_of_the_budget_is_held() -> None:
    limits, _ = limits_with(free=10**6)
    big = Charge(Caller("k" * 32, policy=KeyPolicy(token_budget=TokenBudget(tokens=10**6))), "m", 10, 100)
    assert not limits.holds_plenty(big)  # nothing held yet: the prompt is counted exactly
    await limits.reserve(big)  # granted with a cushion of an eighth of the budget
    assert limits.holds_plenty(big)
    tight = KeyPolicy(token_budget=TokenBudget(tokens=1000))  # never 64 requests' worth held
    small = Charge(Caller("s" * 32, policy=tight), "m", 10, 100)
    await limits.reserve(small)
    assert not limits.holds_plenty(small)
    assert limits.holds_plenty(Charge(Caller("k" * 32), "m", None, 10**9))  # a key without a budget
