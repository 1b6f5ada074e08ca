"""Allowances: a key's limits held across every gateway process and pod, with no database write per request.

A key's limit (the tokens of its budget per period, the requests of its rate per window, the requests it
may have in progress at once) is shared out: each process holds an allowance the database granted, spends
it in memory, and reports what it spent about once a second. Per key and resource the database keeps
what each process holds (`key_allowances`) and what each spent per bucket of time (`key_consumption`). A
grant is made only while

    held by every process + spent within the window + the grant <= the limit,

checked and written in one transaction under a lock on the key's row. What was really used in any window
is at most what was reported spent in it plus what the processes hold, so the limit holds whatever the
number of processes, and a process keeps serving from what it holds while the database is away.

A process refused a grant marks its row (`wanted_ms`); every exchange tells each process which keys
others wanted recently, and a process then keeps no more than it uses of them, so allowance sitting
idle in one process reaches another within an exchange or two.

Every value a process writes is absolute (its own rows), so a write retried after an unclear failure
counts nothing twice. A process that stops renewing its lease (it crashed, or lost the database for
longer than the lease) has its allowances reclaimed by the others: counted as spent, since it may have
spent them (never an overshoot; at worst a key is refused a little early). One that comes back learns it
was reclaimed and keeps only what open requests use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from service.store.rows import upsert
from service.store.schema import api_keys, holders, key_allowances, key_consumption

# Where a lapsed holder's allowance is counted as spent: (key id, resource) -> the bucket now, or None
# when nothing is ever spent of that resource (slots) or the key is gone.
BucketOf = Callable[[str, str], int | None]


@dataclass(frozen=True)
class Plan:
    """What one process tells the store about one key's resource, and what it asks for."""

    key_id: str
    resource: str
    limit: int
    window_start: int | None  # spent buckets counted from this one on (None: a resource never spent)
    held: int  # what this process holds, after what it gives back now
    in_use: int  # what it must keep even when its allowance was reclaimed (open requests)
    spent: Mapping[int, int]  # buckets whose total changed, with the new totals
    ask: int = 0  # more wanted now
    need: int = 0  # the least that is of any use: a smaller grant is none
    standby: bool = False  # asked ahead, for an outage: refused, it tells no other process it is wanted


@dataclass(frozen=True)
class Outcome:
    """What the store recorded and granted for one plan."""

    granted: int
    change: int  # add to the process's own count of what it holds (the grant; less when reclaimed)
    held: int  # what the store now records as this process's
    used: int | None = None  # spent within the window by every process (read only for an ask)
    held_all: int | None = None  # held by every process, this one and its grant included
    spent_by_bucket: tuple[tuple[int, int], ...] = ()  # a refused ask: spent per bucket, oldest first


@dataclass(frozen=True)
class Exchanged:
    """The outcome of one exchange: each plan's, in order, whether this process had been reclaimed, and
    the (key, resource) pairs another process was refused a grant of lately."""

    reclaimed: bool
    outcomes: list[Outcome]
    contended: frozenset[tuple[str, str]] = frozenset()
    processes: int = 1  # processes whose lease is live (this one included), when asked for


def exchange(
    connection: Connection,
    holder: str,
    now_ms: int,
    plans: Sequence[Plan],
    reclaim_lapsed_ms: int | None = None,
    bucket_of: BucketOf | None = None,
    wanted_since_ms: int | None = None,
    lease_ms: int | None = None,
) -> Exchanged:
    """Renew this process's lease, reclaim lapsed holders (when `reclaim_lapsed_ms` is set), write and
    grant every plan, (with `wanted_since_ms`) read what others were refused since then and (with
    `lease_ms`) count the processes renewed within it, in one transaction (the caller's)."""
    reclaimed = _renew(connection, holder, now_ms)  # a write first: SQLite then serializes the rest
    if reclaim_lapsed_ms is not None:
        _reclaim_lapsed(connection, now_ms, reclaim_lapsed_ms, bucket_of or (lambda _k, _r: None))
    ordered = sorted(range(len(plans)), key=lambda i: (plans[i].key_id, plans[i].resource))
    outcomes: dict[int, Outcome] = {}
    for index in ordered:  # one order everywhere: two processes locking keys never wait on each other
        outcomes[index] = _apply(connection, holder, plans[index], reclaimed, now_ms)
    contended: frozenset[tuple[str, str]] = frozenset()
    if wanted_since_ms is not None:
        wanted = connection.execute(
            select(key_allowances.c.key_id, key_allowances.c.resource)
            .where(key_allowances.c.holder != holder, key_allowances.c.wanted_ms >= wanted_since_ms)
            .distinct()
        )
        contended = frozenset((key, resource) for key, resource in wanted)
    processes = 1
    if lease_ms is not None:
        processes = connection.execute(
            select(func.count())
            .select_from(holders)
            .where(holders.c.reclaimed_ms.is_(None), holders.c.renewed_ms >= now_ms - lease_ms)
        ).scalar_one()
    outcomes_in_order = [outcomes[index] for index in range(len(plans))]
    return Exchanged(reclaimed, outcomes_in_order, contended, max(1, int(processes)))


def _renew(connection: Connection, holder: str, now_ms: int) -> bool:
    """Renew the lease; True when the others had reclaimed it (it is renewed all the same)."""
    renewed = connection.execute(
        update(holders)
        .where(holders.c.holder == holder, holders.c.reclaimed_ms.is_(None))
        .values(renewed_ms=now_ms)
    )
    if renewed.rowcount:
        return False
    known = connection.execute(select(holders.c.holder).where(holders.c.holder == holder)).first()
    if known is None:
        connection.execute(insert(holders).values(holder=holder, renewed_ms=now_ms, reclaimed_ms=None))
        return False
    connection.execute(
        update(holders).where(holders.c.holder == holder).values(renewed_ms=now_ms, reclaimed_ms=None)
    )
    return True


def _reclaim_lapsed(connection: Connection, now_ms: int, lapse_ms: int, bucket_of: BucketOf) -> None:
    """Allowances of holders whose lease lapsed: what they held counts as spent now, then they hold none."""
    lapsed = connection.execute(
        select(holders.c.holder).where(
            holders.c.renewed_ms < now_ms - lapse_ms, holders.c.reclaimed_ms.is_(None)
        )
    ).scalars()
    for dead in list(lapsed):
        taken = connection.execute(
            update(holders)
            .where(holders.c.holder == dead, holders.c.reclaimed_ms.is_(None))
            .values(reclaimed_ms=now_ms)
        )
        if not taken.rowcount:
            continue  # another process reclaimed it meanwhile
        rows = connection.execute(
            select(key_allowances).where(key_allowances.c.holder == dead, key_allowances.c.held > 0)
        ).mappings()
        spent = []
        for row in rows:
            bucket = bucket_of(row["key_id"], row["resource"])
            if bucket is not None:
                spent.append({"key_id": row["key_id"], "resource": row["resource"], "holder": dead,
                              "bucket": bucket, "amount": row["held"]})  # fmt: skip
        upsert(connection, key_consumption, spent, ["key_id", "resource", "holder", "bucket"],
               lambda new: {"amount": key_consumption.c.amount + new.amount})  # fmt: skip
        connection.execute(update(key_allowances).where(key_allowances.c.holder == dead).values(held=0))


def _apply(connection: Connection, holder: str, plan: Plan, reclaimed: bool, now_ms: int) -> Outcome:
    """Write one plan's totals and, for an ask, grant what fits under the key's lock."""
    key = (key_allowances.c.key_id == plan.key_id, key_allowances.c.resource == plan.resource)
    spent_key = (key_consumption.c.key_id == plan.key_id, key_consumption.c.resource == plan.resource)
    if plan.ask:  # grants for one key are made one at a time (SQLite: the whole database is)
        connection.execute(select(api_keys.c.id).where(api_keys.c.id == plan.key_id).with_for_update())
    if plan.spent:
        rows = [{"key_id": plan.key_id, "resource": plan.resource, "holder": holder, "bucket": bucket,
                 "amount": amount} for bucket, amount in plan.spent.items()]  # fmt: skip
        upsert(connection, key_consumption, rows, ["key_id", "resource", "holder", "bucket"])
    held = min(plan.held, plan.in_use) if reclaimed else plan.held
    granted = 0
    used = held_all = None
    by_bucket: tuple[tuple[int, int], ...] = ()
    if plan.ask:
        if plan.window_start is not None:
            connection.execute(
                delete(key_consumption).where(*spent_key, key_consumption.c.bucket < plan.window_start)
            )
        others = connection.execute(
            select(func.coalesce(func.sum(key_allowances.c.held), 0)).where(
                *key, key_allowances.c.holder != holder
            )
        ).scalar_one()
        used = 0
        if plan.window_start is not None:
            used = connection.execute(
                select(func.coalesce(func.sum(key_consumption.c.amount), 0)).where(*spent_key)
            ).scalar_one()
        free = plan.limit - int(used) - int(others) - held
        if free >= max(plan.need, 1):
            granted = min(plan.ask, free)
        elif plan.window_start is not None:
            by_bucket = tuple(
                (int(bucket), int(amount)) for bucket, amount in connection.execute(
                    select(key_consumption.c.bucket, func.sum(key_consumption.c.amount))
                    .where(*spent_key).group_by(key_consumption.c.bucket).order_by(key_consumption.c.bucket)
                )
            )  # fmt: skip
        used, held_all = int(used), int(others) + held + granted
    refused = bool(plan.ask) and not granted and not plan.standby
    mine = {"key_id": plan.key_id, "resource": plan.resource, "holder": holder, "held": held + granted,
            "wanted_ms": now_ms if refused else None}  # fmt: skip
    upsert(connection, key_allowances, [mine], ["key_id", "resource", "holder"], _keep_a_refusal)
    change = held - plan.held + granted
    return Outcome(granted, change, held + granted, used, held_all, by_bucket)


def _keep_a_refusal(new: Any) -> dict[str, Any]:
    """A row's new held, its refusal mark kept unless refused again (others read it a while)."""
    return {"held": new.held, "wanted_ms": func.coalesce(new.wanted_ms, key_allowances.c.wanted_ms)}


def statuses(connection: Connection, resource: str, windows: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(spent within its window, held) by every process, for a resource of each key of `windows` (key id
    -> the first bucket of its window): two grouped queries, whatever the number of keys."""
    found = {key_id: [0, 0] for key_id in windows}
    spent = connection.execute(
        select(key_consumption.c.key_id, key_consumption.c.bucket, func.sum(key_consumption.c.amount))
        .where(key_consumption.c.resource == resource)
        .group_by(key_consumption.c.key_id, key_consumption.c.bucket)
    )
    for key_id, bucket, amount in spent:
        if key_id in found and bucket >= windows[key_id]:
            found[key_id][0] += int(amount)
    held = connection.execute(
        select(key_allowances.c.key_id, func.sum(key_allowances.c.held))
        .where(key_allowances.c.resource == resource)
        .group_by(key_allowances.c.key_id)
    )
    for key_id, amount in held:
        if key_id in found:
            found[key_id][1] += int(amount or 0)
    return {key_id: (used, reserved) for key_id, (used, reserved) in found.items()}


def release(connection: Connection, holder: str, now_ms: int) -> None:
    """A process stopping: it holds nothing any more and nobody needs to reclaim it."""
    connection.execute(update(key_allowances).where(key_allowances.c.holder == holder).values(held=0))
    connection.execute(update(holders).where(holders.c.holder == holder).values(reclaimed_ms=now_ms))
