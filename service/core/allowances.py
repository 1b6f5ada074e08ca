"""What one gateway process holds of a key's limit, spent in memory on the request's path (no database
call while it holds enough), and what it tells the store at the next exchange (see service/store/ledger.py).

Three resources, one rule (`held` by every process + spent within the window <= the limit):

- tokens: a budget per period. A request reserves the most it may use (`take`), and at its end gives the
  reservation back and spends what it really used (`spend`).
- requests: a rate. Each request spends one at once (`hit`); spent requests stop counting as the window
  moves on.
- slots: requests in progress at once. Taken at the start (`take`), given back at the end (`give`); nothing
  is ever spent.

A process keeps a cushion beyond what open requests hold (about what it used in the last exchange period,
at most an eighth of the limit) so that most requests need no grant, and gives the rest back at each
exchange so other processes can have it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from service.store.ledger import Outcome, Plan

CUSHION_SHARE = 8  # a process keeps at most limit / 8 beyond what its open requests hold
SLOT_LINGER_SECONDS = 0.1  # a released slot is kept this long (a client's next request usually comes sooner)


class Resource(StrEnum):
    TOKENS = "tokens"
    REQUESTS = "requests"
    SLOTS = "slots"


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
    released_at: float = -math.inf  # slots: when one was last given back
    refused_until: float = 0.0  # a refused ask: until then, the same or a larger one is refused here
    refused_need: int = 0
    view: Outcome | None = None  # the last grant attempt's outcome (for the numbers of a refusal)
    nudged: bool = False  # an exchange is due soon to give back what it no longer uses

    @property
    def available(self) -> int:
        """What a new request may take without asking the store."""
        return self.held - self.pending

    def take(self, amount: int) -> bool:
        """Reserve `amount` (tokens) or hold one slot, if this process holds enough."""
        if self.held - self.pending < amount:
            return False
        self.pending += amount
        self.demand += amount
        return True

    def give(self, amount: int, now: float) -> None:
        """A slot (or an unused reservation) comes back."""
        self.pending = max(0, self.pending - amount)
        self.released_at = now

    def spend(self, reserved: int, used: int, bucket: int) -> None:
        """A request's end: its reservation comes back and what it used is spent, in `bucket`."""
        self.pending = max(0, self.pending - reserved)
        self.held -= used
        if used:
            self.spent[bucket] = self.spent.get(bucket, 0) + used

    def hit(self, bucket: int) -> bool:
        """Spend one request of a rate, if this process holds one."""
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

    def cushion(self) -> int:
        """What to keep beyond what open requests hold."""
        if self.resource is Resource.SLOTS:
            return 0
        return min(max(self.recent_demand, self.demand), self.limit // CUSHION_SHARE)

    def plan(self, now: float, window_start: int | None) -> Plan | None:
        """What to tell the store now, with the waiting requests' asks, having given back what is not
        kept (None: nothing to tell)."""
        keep = self.pending + self.cushion()
        if self.resource is Resource.SLOTS and now - self.released_at < SLOT_LINGER_SECONDS:
            keep = self.held  # just released: the client's next request may want it
        if not self.wanted:  # requests waiting: give nothing back now
            self.held -= max(0, self.held - keep)
        if window_start is not None:  # buckets out of the window, once stored, are forgotten
            for bucket in [
                b for b in self.spent if b < window_start and self.written.get(b) == self.spent[b]
            ]:
                del self.spent[bucket]
                self.written.pop(bucket, None)
        changed = {b: total for b, total in self.spent.items() if self.written.get(b) != total}
        wanted = sum(self.wanted)
        if not changed and self.held == self.written_held and not wanted:
            return None
        extra = min(max(self.recent_demand, self.demand, wanted), self.limit // CUSHION_SHARE)
        if self.resource is Resource.SLOTS:
            extra = 0
        return Plan(
            key_id=self.key_id,
            resource=self.resource.value,
            limit=self.limit,
            window_start=window_start,
            held=self.held,
            in_use=self.pending,
            spent=changed,
            ask=wanted + extra if wanted else 0,
            need=min(self.wanted) if wanted else 0,
        )

    def applied(self, plan: Plan, outcome: Outcome) -> None:
        """The store took `plan`: what it now records, and the grant."""
        self.held += outcome.change
        self.written_held = outcome.held
        self.written.update(plan.spent)
        if plan.ask:
            self.view = outcome
