"""Riding out a database outage: every process holds a standby share of each live key it knows (granted by
the store, so within the limit), serves from what it holds while the store is away and nothing more, and
stops using it once its lease could have lapsed. Several processes over a real SQLite ledger, the store
then away: whatever they did before, all they serve stays within every limit."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from service.core.allowances import STANDBY_RETRY_SECONDS, Allowance, Resource
from service.core.key_limits import Charge, KeyLimits
from service.core.key_policy import KeyPolicy, TokenBudget
from service.core.keys import StoredKey
from service.core.tenancy import Caller
from service.errors import BudgetExceeded, LimitsUnavailable, RateLimited, TooManyInFlight
from service.store import ledger
from service.store.database import Database
from service.store.ledger import Outcome
from tests.unit.test_key_limits import NOON, limits_with
from tests.unit.test_ledger import KEY, store_with_a_key  # noqa: F401 (the `database` fixture)

POLICY = KeyPolicy(rate_limit="60/minute", max_concurrent=4, token_budget=TokenBudget(tokens=1000))


def stored(policy: KeyPolicy = POLICY, revoked: bool = False) -> StoredKey:
    now = datetime.now(UTC)
    return StoredKey(KEY, b"d", "sk-gw-x", "k", policy, now, now if revoked else None)


def charge(most: int, policy: KeyPolicy = POLICY) -> Charge:
    return Charge(Caller(KEY, policy=policy), "m", 1, most)


def test_an_unused_allowance_asks_for_its_standby_share_keeps_it_and_gives_it_up_when_wanted() -> None:
    tokens = Allowance(KEY, Resource.TOKENS, 1000)
    plan = tokens.plan(NOON, 0, standby=250)
    assert plan is not None and (plan.ask, plan.need, plan.standby) == (250, 1, True)
    assert tokens.plan(NOON + 1, 0, standby=250) is None  # asked lately: not again at once
    tokens.applied(plan, Outcome(100, 100, 100))  # the store had only 100 to spare
    again = tokens.plan(NOON + STANDBY_RETRY_SECONDS, 0, standby=250)
    assert again is not None and again.ask == 150 and again.standby
    tokens.applied(again, Outcome(150, 150, 250))
    assert tokens.plan(NOON + 3600, 0, standby=250) is None  # idle for an hour: the share is kept
    tokens.contended_until = NOON + 3605  # another process was refused this key: the share goes
    given_back = tokens.plan(NOON + 3600, 0, standby=250)
    assert given_back is not None and given_back.held == 0 and not given_back.ask


def test_a_request_ask_is_never_taken_for_a_standby_one() -> None:
    tokens = Allowance(KEY, Resource.TOKENS, 1000, wanted=[300])
    plan = tokens.plan(NOON, 0, standby=250)
    assert plan is not None and not plan.standby and plan.need == 300


def test_the_standby_share_is_half_a_rate_or_cap_and_an_eighth_of_a_budget_shared_by_the_processes() -> None:
    limits, _ = limits_with(free=0)
    limits.prepare([stored()])
    shares = {resource: limits.standby(a) for (_, resource), a in limits.allowances.items()}
    assert shares == {Resource.REQUESTS: 30, Resource.SLOTS: 2, Resource.TOKENS: 125}
    limits.processes = 3
    shares = {resource: limits.standby(a) for (_, resource), a in limits.allowances.items()}
    assert shares == {Resource.REQUESTS: 10, Resource.SLOTS: 0, Resource.TOKENS: 41}
    limits.prepare([stored(KeyPolicy(models=["m"])), stored(revoked=True)])  # nothing to count: no more
    assert len(limits.allowances) == 3


async def test_a_known_key_never_used_here_is_served_from_its_share_in_an_outage_and_no_more() -> None:
    limits, store = limits_with(free=10**6)
    limits.prepare([stored()])
    await store.ask(limits.allowances[(KEY, Resource.TOKENS)])  # the periodic exchange: shares granted
    store.reachable = False
    key = stored()
    for _ in range(30):
        await limits.hit(key)
    with pytest.raises(LimitsUnavailable):
        await limits.hit(key)
    slots = [await limits.hold_slot(key) for _ in range(2)]
    with pytest.raises(LimitsUnavailable):
        await limits.hold_slot(key)
    limits.release_slot(slots[0])
    await limits.hold_slot(key)  # a slot given back is held again
    await limits.reserve(charge(100))
    await limits.reserve(charge(25))
    with pytest.raises(LimitsUnavailable):
        await limits.reserve(charge(1))


async def test_what_is_held_is_not_used_once_the_lease_could_have_lapsed() -> None:
    now = [NOON]
    limits, store = limits_with(free=10**6)
    limits.clock = limits.monotonic = lambda: now[0]
    limits.prepare([stored()])
    await store.ask(limits.allowances[(KEY, Resource.REQUESTS)])
    limits.holds_until = NOON + 24  # an exchange began 30 s x 0.8 before
    store.reachable = False
    await limits.hit(stored())
    now[0] = NOON + 24
    with pytest.raises(LimitsUnavailable):
        await limits.hit(stored())
    assert limits.allowances[(KEY, Resource.REQUESTS)].available == 29  # held, but no longer its own

    async def nothing_to_tell(_allowance: Allowance) -> bool:
        return True  # an exchange with nothing to tell answers at once, without the store

    limits.ask = nothing_to_tell
    with pytest.raises(LimitsUnavailable):
        await limits.hit(stored())


async def test_a_wall_clock_set_back_does_not_lengthen_the_hold() -> None:
    """The others reclaim a lapsed lease by their own clocks: this process's hold runs on its monotonic
    clock, so a wall clock stepped back (NTP) cannot keep it spending what may have been reclaimed."""
    wall, steady = [NOON], [100.0]
    limits, store = limits_with(free=10**6)
    limits.clock, limits.monotonic = (lambda: wall[0]), (lambda: steady[0])
    limits.prepare([stored()])
    await store.ask(limits.allowances[(KEY, Resource.REQUESTS)])
    limits.holds_until = steady[0] + 24
    store.reachable = False
    await limits.hit(stored())
    steady[0] += 25
    wall[0] -= 60  # set back a minute: by the wall clock, the hold would have 59 s to go
    with pytest.raises(LimitsUnavailable):
        await limits.hit(stored())


# ---------------------------------------------------------------- several processes, one real ledger


class Process:
    """One gateway process's limits, exchanging with the shared ledger synchronously (while it is up)."""

    def __init__(self, name: str, database: Database, clock: list[float], up: list[bool]) -> None:
        self.name, self.database, self.clock, self.up = name, database, clock, up
        self.limits = KeyLimits(self.ask, wait_seconds=1, clock=lambda: clock[0], contention_wait=0)
        self.limits.prepare([stored()])

    async def ask(self, _allowance: Allowance | None = None) -> bool:
        if not self.up[0]:
            return False
        plans = self.limits.plans()
        with self.database.transaction() as connection:
            now_ms = int(self.clock[0] * 1000)
            done = ledger.exchange(connection, self.name, now_ms, [p for _, p in plans], lease_ms=30_000)
        self.limits.processes = done.processes
        for (allowance, plan), outcome in zip(plans, done.outcomes, strict=True):
            allowance.applied(plan, outcome)
        return True


async def serve(process: Process, served: dict[str, list[float]], rng: random.Random) -> None:
    """One request: a rate hit, a slot, a reservation settled with part of it (what was used counted)."""
    key, now = stored(), process.clock[0]
    try:
        await process.limits.hit(key)
        served["requests"].append(now)
        slot = await process.limits.hold_slot(key)
    except (RateLimited, TooManyInFlight, LimitsUnavailable):
        return
    try:
        reserved = charge(rng.randint(1, 60))
        await process.limits.reserve(reserved)
        used = rng.randint(0, reserved.most)
        process.limits.settle(reserved, used)
        served["tokens"].append(used)
    except (BudgetExceeded, LimitsUnavailable):
        pass
    finally:
        process.limits.release_slot(slot)


@pytest.mark.parametrize("seed", range(6))
async def test_processes_riding_out_an_outage_never_pass_a_limit_together(
    database: Database, seed: int
) -> None:
    rng = random.Random(seed)
    clock, up = [NOON], [True]
    processes = [Process(f"p{i}", database, clock, up) for i in range(rng.randint(2, 4))]
    for process in processes:
        await process.ask()  # each learns how many they are, then asks for its shares
    served: dict[str, list[float]] = {"requests": [], "tokens": []}
    outage_at = rng.randint(100, 400)
    for step in range(600):
        clock[0] += rng.random() * 0.3
        up[0] = step < outage_at  # then the database goes away, for every process
        process = rng.choice(processes)
        if up[0] and rng.random() < 0.2:
            for allowance in process.limits.allowances.values():
                allowance.next_period()
            await process.ask()
        await serve(process, served, rng)
    assert not up[0] and served["requests"]
    assert sum(served["tokens"]) <= 1000  # the budget (its period is the day: the whole run)
    for start in served["requests"]:  # the rate: within any minute (its buckets are 1/RATE_BUCKETS of it)
        window = [t for t in served["requests"] if start <= t < start + 60]
        assert len(window) <= 60, (start, len(window))


async def test_an_exchange_skips_idle_allowances_until_something_happens() -> None:
    limits, store = limits_with(free=10**6)
    limits.prepare([stored()])
    await store.ask(limits.allowances[(KEY, Resource.TOKENS)])  # the shares granted
    assert limits.plans() == [] and all(a.calm for a in limits.allowances.values())
    await limits.hit(stored())  # a request: its allowance tells the store what it spent
    assert [plan.resource for _, plan in limits.plans()] == ["requests"]
    limits.processes = 2  # another process: every share is halved, so every allowance gives some back
    assert sorted(plan.resource for _, plan in limits.plans()) == ["requests", "slots", "tokens"]


def test_a_lease_that_fits_too_few_exchanges_stops_start_up() -> None:
    from pydantic import ValidationError

    from service.ops.settings import Settings

    with pytest.raises(ValidationError, match=r"keys_lease_seconds \(10\) must be at least 4 x keys_sync"):
        Settings(keys_lease_seconds=10, keys_sync_interval=5)
    assert Settings(keys_lease_seconds=20, keys_sync_interval=5).keys_lease_seconds == 20
