"""What one gateway process holds of a key's limit, spent in memory on the request's path (no database
call while it holds enough), and what it tells the store at the next exchange (see service/store/ledger.py).

Three resources, one rule (`held` by every process + spent within the window <= the limit):

- tokens: a budget per period. A request reserves the most it may use (`take`), and at its end gives the
  reservation back and spends what it really used (`spend`).
- requests: a rate. Each request spends one at once (`hit`); spent requests stop counting as the window
  moves on.
- slots: requests in progress at once. Taken at the start (`take`), given back at the end (`give`); nothing
  is ever spent.

A process that uses a key keeps a cushion beyond what open requests hold (an eighth of the limit; one
slot), so that most requests need no grant. When another process was refused lately (the store says so at
each exchange) the cushion shrinks to what the last exchange period used (no slot), and an allowance
unused for IDLE_SECONDS is given back down to its standby share.

The standby share is how a database outage is ridden out: every process holds, of every live key it
knows, used or not, limit / (STANDBY_SHARE[resource] x the processes the store counts), granted by the
store like any other allowance (so within the rule above) and given back while another process wants the
key. A budget's share is smaller: a process that crashes has what it held counted as spent for the period.
During an outage a process serves from what it holds and nothing more: nothing is granted while the
store is away, so whatever the outage (every process or some, long or short) no limit is passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from service.store.ledger import Outcome, Plan

CUSHION_SHARE = 8  # a process keeps at most limit / 8 beyond what its open requests hold
SLOT_LINGER_SECONDS = 0.1  # a released slot is kept this long (a client's next request usually comes sooner)
IDLE_SECONDS = 10.0  # an allowance unused this long is given back, down to its standby share
CONTENDED_SECONDS = 5.0  # after the store says another process wanted a key, cushions stay small this long


class Resource(StrEnum):
    TOKENS = "tokens"
    REQUESTS = "requests"
    SLOTS = "slots"


# What part of a limit the processes together hold ahead for an outage (the rest goes to who asks): half of
# a rate or a concurrency cap (a crashed process's share counts for one window, or comes back); an eighth
# of a budget (a crashed process's share counts as spent until the period ends).
STANDBY_SHARE = {Resource.REQUESTS: 2, Resource.SLOTS: 2, Resource.TOKENS: 8}
STANDBY_RETRY_SECONDS = 10.0  # a standby share asked for (granted or not) is not asked for again sooner


@dataclass(eq=False)
class Allowance:
    """One key's resource as this process holds it."""

    key_id: str
    resource: Resource
    limit: int
    held: int = 0  # granted by the store and not spent (what open requests hold included)
    pending: int = 0  # tokens reserved by open requests, or slots in use
    spent: dict[int, int] = field(default_factory=dict)  # bucket -> this process's total spent there
    written: dict[int, int] = field(default_factory=dict)  # the totals the store has
    written_held: int = 0  # what the store records as held by this process
    wanted: list[int] = field(default_factory=list)  # asks of requests waiting for the next exchange
    demand: int = 0  # taken since the last exchange period began
    recent_demand: int = 0  # taken during the last whole period
    peak: int = 0  # slots: the most in use at once since the last period began
    recent_peak: int = 0  # slots: the most in use at once during the last whole period
    released_at: float = -math.inf  # slots: when one was last given back
    refused_until: float = 0.0  # a refused ask: until then (or until something comes back), the same
    # or a larger one is refused here without asking the store again
    refused_need: int = 0
    view: Outcome | None = None  # the last grant attempt's outcome (for the numbers of a refusal)
    nudged: bool = False  # an exchange is due soon to give back what it no longer uses
    last_taken: float = -math.inf  # when a request last took some
    contended_until: float = 0.0  # another process wanted this key lately: keep only what is used
    returning: int = 0  # given back by the exchange under way (restored if it surely failed)
    store_refused: bool = False  # the last exchange asked for more and got nothing
    standby_asked_at: float = -math.inf  # when this process last asked for its standby share
    # Idle, holding what it keeps, the store told everything: exchanges skip it until something happens
    # (a request, a grant, a failed exchange, another process wanting the key, a new process count).
    calm: bool = False

    @property
    def available(self) -> int:
        """What a new request may take without asking the store."""
        return self.held - self.pending

    def take(self, amount: int, now: float) -> bool:
        """Reserve `amount` (tokens) or hold one slot, if this process holds enough."""
        self.last_taken, self.calm = now, False
        amount = max(0, amount)  # a negative reservation would hand out what others hold
        if self.held - self.pending < amount:
            return False
        self.pending += amount
        self.demand += amount
        self.peak = max(self.peak, self.pending)
        return True

    def give(self, amount: int, now: float) -> None:
        """A slot (or an unused reservation) comes back."""
        self.pending = max(0, self.pending - amount)
        self.released_at = now
        self.calm = False
        self.refused_until = 0.0  # something came back: a refused ask may fit now

    def spend(self, reserved: int, used: int, bucket: int) -> None:
        """A request's end: its reservation comes back and what it used is spent, in `bucket`."""
        self.pending = max(0, self.pending - reserved)
        self.held -= used
        self.calm = False
        self.refused_until = 0.0  # something came back: a refused ask may fit now
        if used:
            self.spent[bucket] = self.spent.get(bucket, 0) + used

    def hit(self, bucket: int, now: float) -> bool:
        """Spend one request of a rate, if this process holds one."""
        self.last_taken, self.calm = now, False
        if self.held - self.pending < 1:
            return False
        self.held -= 1
        self.demand += 1
        self.spent[bucket] = self.spent.get(bucket, 0) + 1
        return True

    def refused_now(self, amount: int, now: float) -> bool:
        """Whether an ask of `amount` was refused so recently that asking again is pointless."""
        return now < self.refused_until and amount >= self.refused_need

    def next_period(self) -> None:
        """An exchange period ends: what was taken in it sizes the cushion."""
        self.recent_demand, self.demand = self.demand, 0
        self.recent_peak, self.peak = self.peak, self.pending

    def cushion(self, now: float) -> int:
        """What to keep beyond what open requests hold."""
        if self.limit <= 0 or now - self.last_taken > IDLE_SECONDS:
            return 0
        contended = now < self.contended_until
        if self.resource is Resource.SLOTS:  # as many as were in use lately, and one more
            return 0 if contended else max(0, max(self.peak, self.recent_peak) + 1 - self.pending)
        if contended:
            return min(max(self.recent_demand, self.demand), self.limit // CUSHION_SHARE)
        return self.limit // CUSHION_SHARE

    def plan(
        self, now: float, window_start: int | None, standby: int = 0, ask_standby: bool = True
    ) -> Plan | None:
        """What to tell the store now, with the waiting requests' asks (else, `ask_standby`, the standby
        share it lacks), having given back what is not kept (None: nothing to tell)."""
        if self.limit <= 0 or now < self.contended_until:
            standby = 0  # a key gone, or wanted elsewhere: its share goes where it is used
        keep = max(self.pending + self.cushion(now), min(standby, self.limit))
        if self.resource is Resource.SLOTS and now - self.released_at < SLOT_LINGER_SECONDS:
            keep = max(keep, self.held)  # just released: the client's next request may want it
        self.returning = 0
        if not self.wanted:  # requests waiting: give nothing back now
            self.returning = max(0, self.held - keep)
            self.held -= self.returning
        if window_start is not None:  # buckets out of the window, once stored, are forgotten
            for bucket in [
                b for b in self.spent if b < window_start and self.written.get(b) == self.spent[b]
            ]:
                del self.spent[bucket]
                self.written.pop(bucket, None)
        changed = {b: total for b, total in self.spent.items() if self.written.get(b) != total}
        ask, need, for_standby = self._ask(now, standby, ask_standby)
        if not changed and self.held == self.written_held and not ask:
            idle = not self.pending and not self.wanted and now - self.last_taken > IDLE_SECONDS
            self.calm = idle and self.held == keep and now >= self.contended_until
            return None
        return Plan(
            key_id=self.key_id,
            resource=self.resource.value,
            limit=self.limit,
            window_start=window_start,
            held=self.held,
            in_use=self.pending,
            spent=changed,
            ask=ask,
            need=need,
            standby=for_standby,
        )

    def _ask(self, now: float, standby: int, ask_standby: bool) -> tuple[int, int, bool]:
        """(more wanted, the least of any use, whether only for the standby share)."""
        own = max(0, self.held - self.pending)  # what waiting requests can already count on
        missing = max(0, sum(self.wanted) - own)
        if missing:
            return missing + self.cushion(now), max(1, min(self.wanted) - own), False
        lacking = ask_standby and not self.wanted and self.held < standby
        if lacking and now - self.standby_asked_at >= STANDBY_RETRY_SECONDS:
            self.standby_asked_at = now
            return standby - self.held, 1, True
        return 0, 0, False

    def failed(self) -> None:
        """The exchange surely did not reach the store: what it gave back is still held there."""
        self.held += self.returning
        self.returning = 0
        self.calm = False

    def applied(self, plan: Plan, outcome: Outcome) -> None:
        """The store took `plan`: what it now records, and the grant."""
        self.returning = 0
        self.held += outcome.change
        self.calm = False
        self.written_held = outcome.held
        self.written.update(plan.spent)
        if plan.ask:
            self.view = outcome
        self.store_refused = bool(plan.ask) and outcome.granted == 0
