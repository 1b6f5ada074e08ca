"""A runtime key's limits on the request's path: its rate (a request spends one), its requests in progress
(a slot held until the end), its token budget (a request reserves the most it may use, and at its end
spends what it used). Each is an `Allowance` this process holds; only when it holds too little does a
request wait for an exchange with the store (`ask`), and a refusal then carries the numbers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from service.core.allowances import SLOT_LINGER_SECONDS, STANDBY_SHARE, Allowance, Resource
from service.core.key_policy import RATE_BUCKETS, KeyPolicy, rate_bucket, rate_window
from service.core.keys import StoredKey
from service.core.tenancy import Caller
from service.errors import BudgetExceeded, LimitsUnavailable, RateLimited, TooManyInFlight, shown
from service.store.ledger import Plan

ASK_ATTEMPTS = 3  # a request asks the store at most this many times before it is refused
REFUSED_SECONDS = 1.0  # a refused ask is not asked again (for as much or more) for this long
PLENTY = 64  # requests' worth of a budget held: below, a prompt is counted exactly to reserve it
STANDBY_ASKS = 64  # standby shares asked for in one exchange at most (thousands of keys: over a few minutes)
# ask(allowance) waits for an exchange that includes `allowance`; whether it reached the store.
Ask = Callable[[Allowance], Awaitable[bool]]


@dataclass
class Charge:
    """What one request may cost its key's token budget, and (at its end) what it cost."""

    caller: Caller
    model: str
    prompt_tokens: int | None  # as the gateway counted them (None: not counted)
    most: int  # the most it may use: every prompt, plus n completions of at most max_tokens each
    reserved: int = 0  # held in the key's budget while it runs
    settled: bool = False


def most_tokens(prompts: Sequence[int] | None, max_tokens: int | None, n: int, context: int) -> int:
    """The most tokens a request may use: each prompt (vLLM counts it once, whatever `n`) plus `n`
    completions of at most `max_tokens` (omitted: vLLM's default, the rest of the context). Prompts not
    counted: at most a context each completion, less what max_tokens leaves to the prompt. A value vLLM
    refuses (`max_tokens` below 0, `n` below 1) reserves as the most it could be, never less than nothing."""
    n = max(1, n)
    if max_tokens is not None and max_tokens < 0:
        max_tokens = None  # the worker refuses it; meanwhile it holds what an omitted one would
    if prompts is None:
        return n * context if max_tokens is None else max(0, context - max_tokens) + n * max_tokens
    total = 0
    for length in prompts:
        generated = max_tokens if max_tokens is not None else max(0, context - length)
        total += length + n * generated
    return total


class KeyLimits:
    """Every runtime key's allowances in this process, and the checks the request path makes."""

    def __init__(
        self,
        ask: Ask,
        wait_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        contention_wait: float = 1.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ask = ask
        self.wait_seconds = wait_seconds
        self.contention_wait = contention_wait  # how long others take to give back what they do not use
        self.clock = clock  # the wall clock: periods and rate windows are calendar times
        self.monotonic = monotonic  # the lease's hold: a wall clock set back must not lengthen it
        self.allowances: dict[tuple[str, Resource], Allowance] = {}
        self.policies: dict[str, KeyPolicy] = {}  # key id -> policy, for the buckets of its allowances
        self.processes = 1  # gateway processes the store counted at the last exchange
        # After this (`monotonic`'s time), what this process holds may have been reclaimed by the others
        # (its lease lapsed): it is not used until an exchange renews the lease.
        self.holds_until = math.inf
        self._planned_for = 1  # the process count the last plans were made for

    def allowance(self, key_id: str, policy: KeyPolicy, resource: Resource, limit: int) -> Allowance:
        """This process's allowance of a key's resource (none held at first)."""
        found = self.allowances.get((key_id, resource))
        if found is None:
            found = self.allowances[(key_id, resource)] = Allowance(key_id, resource, limit)
            self.policies[key_id] = policy
        return found

    def prepare(self, keys: Iterable[StoredKey]) -> None:
        """An allowance of every limit of every live key, used here or not, so that each holds its
        standby share (asked for at the next exchanges) to ride out an outage."""
        for key in keys:
            policy = key.policy
            if key.revoked or not policy.limited:
                continue
            if policy.rate_limit:
                self.allowance(key.id, policy, Resource.REQUESTS, rate_window(policy.rate_limit)[0])
            if policy.max_concurrent:
                self.allowance(key.id, policy, Resource.SLOTS, policy.max_concurrent)
            if policy.token_budget:
                self.allowance(key.id, policy, Resource.TOKENS, policy.token_budget.tokens)

    def standby(self, allowance: Allowance) -> int:
        """The share of a key's limit this process holds ahead for an outage: the limit divided by
        its STANDBY_SHARE times the processes the store counts (all of them together: half of a rate or a
        concurrency cap, an eighth of a budget)."""
        return allowance.limit // (STANDBY_SHARE[allowance.resource] * max(1, self.processes))

    def usable(self) -> bool:
        """Whether what this process holds is still its own (its lease has not lapsed)."""
        return self.monotonic() < self.holds_until

    # ------------------------------------------------------------------ the checks

    async def hit(self, key: StoredKey) -> None:
        """Spend one request of the key's rate, or refuse (429 with Retry-After)."""
        rate = key.policy.rate_limit
        assert rate is not None
        limit, seconds = rate_window(rate)
        allowance = self.allowance(key.id, key.policy, Resource.REQUESTS, limit)
        now = self.clock()
        if self.usable() and allowance.hit(rate_bucket(seconds, now), now):
            return
        if not allowance.refused_now(1, now):
            if await self._granted(
                allowance, 1, "request rate", lambda t: allowance.hit(rate_bucket(seconds, t), t)
            ):
                return
            now = self.clock()
            allowance.refused_until, allowance.refused_need = now + min(seconds / RATE_BUCKETS, 1.0), 1
        raise RateLimited(rate, self._rate_retry(allowance, seconds))

    async def hold_slot(self, key: StoredKey) -> Allowance:
        """One of the key's slots for a request in progress (`give` it back at the end), or a 429."""
        cap = key.policy.max_concurrent
        assert cap is not None
        allowance = self.allowance(key.id, key.policy, Resource.SLOTS, cap)
        if self.usable() and allowance.take(1, self.clock()):
            return allowance
        if not allowance.refused_now(1, self.clock()):
            if await self._granted(allowance, 1, "concurrency limit", lambda t: allowance.take(1, t)):
                return allowance
            allowance.refused_until, allowance.refused_need = self.clock() + SLOT_LINGER_SECONDS, 1
        raise TooManyInFlight(cap)

    def release_slot(self, allowance: Allowance) -> None:
        """A request's slot comes back (kept a moment for the key's next request)."""
        allowance.give(1, self.clock())

    async def reserve(self, charge: Charge) -> None:
        """Hold the most `charge` may use in its key's budget, or refuse (429 with the numbers)."""
        policy = charge.caller.policy
        budget = policy.token_budget if policy else None
        if budget is None or charge.caller.key_id is None:
            return
        assert policy is not None
        allowance = self.allowance(charge.caller.key_id, policy, Resource.TOKENS, budget.tokens)
        if charge.most > budget.tokens:
            raise self._over_budget(allowance, policy, charge.most, never=True)
        if not (self.usable() and allowance.take(charge.most, self.clock())):
            if allowance.refused_now(charge.most, self.clock()):
                raise self._over_budget(allowance, policy, charge.most)
            if not await self._granted(
                allowance, charge.most, "token budget", lambda t: allowance.take(charge.most, t)
            ):
                allowance.refused_until, allowance.refused_need = self.clock() + REFUSED_SECONDS, charge.most
                raise self._over_budget(allowance, policy, charge.most)
        charge.reserved = charge.most

    def holds_plenty(self, charge: Charge) -> bool:
        """Whether this process holds what PLENTY requests like `charge` would reserve of its key's
        budget (a key without a budget: it does), so that charging a prompt its upper bound, not its
        count, cannot refuse a request that its exact count would let through."""
        policy = charge.caller.policy
        if policy is None or policy.token_budget is None or charge.caller.key_id is None:
            return True
        allowance = self.allowances.get((charge.caller.key_id, Resource.TOKENS))
        return allowance is not None and allowance.available >= charge.most * PLENTY

    def settle(self, charge: Charge, used: int) -> None:
        """The request ended having used `used` tokens: its reservation comes back, they are spent."""
        if charge.settled:
            return
        charge.settled = True
        policy = charge.caller.policy
        budget = policy.token_budget if policy else None
        if budget is None or charge.caller.key_id is None:
            return
        allowance = self.allowances.get((charge.caller.key_id, Resource.TOKENS))
        if allowance is not None:
            allowance.spend(charge.reserved, used, budget.bucket(self.clock()))

    async def _granted(
        self, allowance: Allowance, amount: int, what: str, take: Callable[[float], bool]
    ) -> bool:
        """Ask the store, then `take`; asked again (a few times) when requests that did not wait took
        what was granted for the ones that did, as long as the store did not refuse."""
        for _ in range(ASK_ATTEMPTS):
            await self._ask(allowance, amount, what)
            if take(self.clock()):
                return True
            if allowance.store_refused:
                return False
        return False

    async def _ask(self, allowance: Allowance, amount: int, what: str) -> None:
        """Wait for an exchange that asks the store for `amount` more (503 if it cannot be reached);
        refused while other processes hold some of the limit, once more after they had time to give
        back what they do not use (the refusal told them)."""
        allowance.wanted.append(amount)
        allowance.calm = False
        try:
            for attempt in range(2):
                reached = await _wait(self.ask(allowance), self.wait_seconds)
                # An exchange with nothing to tell answers without the store: it renews no lease.
                if not reached or not self.usable():
                    raise LimitsUnavailable(what)
                view = allowance.view
                others = view.held_all - allowance.held if view and view.held_all is not None else 0
                if allowance.available >= amount or others <= 0 or attempt:
                    return
                await asyncio.sleep(self.contention_wait)
        finally:
            allowance.wanted.remove(amount)

    # ------------------------------------------------------------------ exchanges

    def plans(self, only: Iterable[Allowance] | None = None) -> list[tuple[Allowance, Plan]]:
        """What the allowances (`only` these, else all) tell the store now, with the waiting requests'
        asks."""
        now = self.clock()
        found = []
        standby_asks = STANDBY_ASKS
        recount = self.processes != self._planned_for  # every share changes: none is calm
        self._planned_for = self.processes
        for allowance in list(self.allowances.values() if only is None else only):
            if allowance.calm and not recount:
                continue
            allowance.nudged = False
            plan = allowance.plan(
                now, self.window_start(allowance, now), self.standby(allowance), standby_asks > 0
            )
            if plan is not None:
                standby_asks -= plan.standby
                found.append((allowance, plan))
        return found

    def window_start(self, allowance: Allowance, now: float) -> int | None:
        """The first bucket that still counts for an allowance (None: slots, never spent)."""
        policy = self.policies.get(allowance.key_id)
        if policy is None or allowance.resource is Resource.SLOTS:
            return None
        if allowance.resource is Resource.TOKENS:
            return policy.token_budget.bucket(now) if policy.token_budget else None
        if policy.rate_limit is None:
            return None
        return rate_bucket(rate_window(policy.rate_limit)[1], now) - RATE_BUCKETS

    def bucket_now(self, key_id: str, resource: str) -> int | None:
        """Where a lapsed process's allowance of a key's resource is counted as spent."""
        policy = self.policies.get(key_id)
        if policy is None or resource == Resource.SLOTS:
            return None
        now = self.clock()
        if resource == Resource.TOKENS:
            return policy.token_budget.bucket(now) if policy.token_budget else None
        return rate_bucket(rate_window(policy.rate_limit)[1], now) if policy.rate_limit else None

    def retire(self, live: Callable[[str], KeyPolicy | None]) -> None:
        """Keys revoked or gone: their allowances keep only what open requests hold (the rest goes back
        at the next exchange), and are forgotten once empty and stored."""
        for place, allowance in list(self.allowances.items()):
            if live(allowance.key_id) is not None:
                continue
            allowance.limit = 0
            allowance.recent_demand = allowance.demand = 0
            allowance.calm = False
            if not allowance.pending and not allowance.held and allowance.written_held == 0:
                unwritten = any(allowance.written.get(b) != v for b, v in allowance.spent.items())
                if not unwritten:
                    del self.allowances[place]

    # ------------------------------------------------------------------ refusals

    def _over_budget(
        self, allowance: Allowance, policy: KeyPolicy, most: int, never: bool = False
    ) -> BudgetExceeded:
        """The 429 of a request that does not fit its key's budget, with the numbers."""
        budget = policy.token_budget
        assert budget is not None
        now = self.clock()
        view = allowance.view
        used = view.used if view is not None and view.used is not None else 0
        reserved = view.held_all if view is not None and view.held_all is not None else allowance.held
        left = max(0, budget.tokens - used - reserved)
        resets = budget.resets_at(now)
        period = "in all" if resets is None else f"per {budget.period.value}"
        most_shown = shown(most, grouped=True)
        ask = f"this request may use up to {most_shown} tokens (its prompt plus what max_tokens allows)"
        whole = f"This API key's token budget is {budget.tokens:,} tokens {period}"
        if never:
            fewer = "ask for fewer tokens (lower max_tokens, or a shorter prompt)"
            message = f"{whole}; {ask}, more than the whole budget: {fewer}."
        else:
            held = "held by the gateway for requests in progress, use not yet recorded and outages"
            numbers = f"{used:,} used, {reserved:,} reserved ({held}), {left:,} left"
            message = f"{whole}: {numbers}; {ask}."
        headers = {
            "X-Token-Budget-Limit": str(budget.tokens),
            "X-Token-Budget-Used": str(used),
            "X-Token-Budget-Reserved": str(reserved),
            "X-Token-Budget-Left": str(left),
        }
        if resets is not None:
            message += f" The budget starts again at {_iso(resets)}."
            headers["X-Token-Budget-Reset"] = _iso(resets)
        if not never:
            fits_later = most <= budget.tokens - used  # once reservations are settled or given back
            if fits_later:
                headers["Retry-After"] = "1"
            elif resets is not None:
                headers["Retry-After"] = str(max(1, math.ceil(resets.timestamp() - now)))
        return BudgetExceeded(message, headers)

    def _rate_retry(self, allowance: Allowance, seconds: float) -> int:
        """Seconds until one more request fits the key's rate: when the oldest buckets holding enough
        requests stop counting (1 when what other processes hold is in the way)."""
        view = allowance.view
        if view is None or view.used is None or view.held_all is None:
            return 1
        excess = view.used + view.held_all + 1 - allowance.limit
        step = seconds / RATE_BUCKETS
        freed = 0
        for bucket, amount in view.spent_by_bucket:
            freed += amount
            if freed >= excess:
                return max(1, math.ceil((bucket + RATE_BUCKETS + 1) * step - self.clock()))
        return 1


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def _wait(work: Awaitable[bool], seconds: float) -> bool:
    """`work`'s answer, or False after `seconds` (the exchange goes on: what it grants is kept)."""
    try:
        return await asyncio.wait_for(asyncio.shield(work), seconds)
    except TimeoutError:
        return False
