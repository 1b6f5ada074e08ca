"""Keys managed at runtime, in one gateway process: who they are, their limits and their usage.

The request path never waits on the database for a key check: every process holds the keys in memory
(`KeyDirectory`) and looks at the store's `keys` revision every GATEWAY_KEYS_SYNC_INTERVAL seconds,
reloading them when it moved. A key created or revoked through this process takes effect here at once,
in the other processes and pods at their next look.

The same periodic exchange (one transaction) renews this process's lease, writes its usage totals and
what it spent of each key's limits, gives back allowance it does not need, and reclaims the allowances
of processes whose lease lapsed. A request that needs more allowance than this process holds asks for
an exchange at once (coalesced with the others waiting). When the database is unreachable, known keys
keep being served within what this process holds, and usage waits in memory to be written when it is
back. Stopping, the process writes everything and gives its allowances back; with the database still away,
its unwritten usage goes to a spool file that a later process writes (`service.core.usage_spool`).

What a process holds is its own until its lease could lapse: from the start of its last exchange that
reached the store, LEASE_USED of GATEWAY_KEYS_LEASE_SECONDS (the rest spares clocks that differ). After
that the others may have reclaimed it, so it is not used until the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from service.core.allowances import CONTENDED_SECONDS, SLOT_LINGER_SECONDS, Allowance
from service.core.key_limits import Charge, KeyLimits, most_tokens
from service.core.key_policy import KeyPolicy
from service.core.keys import KeyDirectory, StoredKey, as_row, from_row, new_key
from service.core.tenancy import Caller
from service.core.usage import ERRORS, REQUESTS, TOKENS_IN, TOKENS_OUT, KeyMetrics, UsageBook
from service.core.usage_spool import UsageSpool
from service.errors import GatewayError, StoreUnavailable, TooManyKeys
from service.ops.record import RequestRecord
from service.ops.settings import Settings
from service.store import keys as key_rows
from service.store import ledger
from service.store.database import Database
from service.store.rows import revision
from service.store.usage import read_usage, write_usage

log = logging.getLogger(__name__)
STOP_RETRY_SECONDS = 10.0  # stopping with the database away: how long to keep trying to write usage
ERROR_LOG_EVERY = 60.0
LEASE_USED = 0.8  # of the lease, from an exchange's start, during which what a process holds is its own


@dataclass
class Stage:
    """How far an exchange's transaction got (a failure before its commit surely stored nothing)."""

    committing: bool = False


@dataclass
class Synced:
    """What one exchange brought back."""

    exchanged: ledger.Exchanged
    keys: list[StoredKey] | None  # the store's keys when its revision moved, else None
    revision: int


class Tenants:
    """Runtime keys in this process: the directory, their limits, their usage, and the exchanges."""

    def __init__(self, settings: Settings, database: Database, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.database = database
        self.holder = uuid.uuid4().hex
        self.directory = KeyDirectory()
        self.metrics = KeyMetrics(registry)
        self.usage = UsageBook(settings.usage_max_rows, self.metrics.dropped.inc)
        self.spool = UsageSpool(settings.cache_dir, database.url, settings.usage_max_rows)
        self._spool_due = True  # spools of stopped processes to write once the store is reachable
        # A refused request asks again once others had an exchange to give back what they do not use.
        contention_wait = 1.5 * settings.keys_sync_interval + 0.05
        self.limits = KeyLimits(self.exchange_soon, settings.keys_store_wait, contention_wait=contention_wait)
        self._next: asyncio.Future[bool] | None = None
        self._next_full = False
        self._next_only: dict[int, Allowance] = {}  # the allowances the next exchange is for (unless full)
        self._runner: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._connected_since: float | None = None  # monotonic; None while the store is away
        self._last_error_log = -ERROR_LOG_EVERY

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the keys (before serving: a process never serves without knowing them), then follow."""
        started = time.monotonic()
        keys, current = await self.database.run(self._load)
        self._adopt(keys, current)
        self._connected_since = time.monotonic()
        self._holds_until(started)
        await self._fold_spools()
        self._loop = asyncio.create_task(self._follow())
        log.info("%d API key(s) managed at runtime (%d revoked)", len(keys), sum(k.revoked for k in keys))

    async def stop(self) -> None:
        """Write every usage total and give every allowance back (the drain is over); retried a while
        if the database is away, then what could not be written is logged."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        self.metrics.report()  # the drain is over: every request's counts
        deadline = time.monotonic() + STOP_RETRY_SECONDS
        while True:
            try:  # bounded: a database that stops answering without closing the connection never fails
                async with asyncio.timeout(STOP_RETRY_SECONDS):
                    if await self._exchange(full=True, final=True):
                        return
            except TimeoutError:
                log.warning("the database did not answer within %g s", STOP_RETRY_SECONDS)
            if time.monotonic() > deadline:
                await self.spool.keep_unwritten(self.holder, self.usage.unwritten(self.holder))
                return
            await asyncio.sleep(0.5)

    async def _fold_spools(self) -> None:
        """Write the usage spooled by processes that stopped while the database was away (once)."""
        self._spool_due = not await self.spool.write(self.database)  # else again once the store is back

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.keys_sync_interval)
            self.metrics.report()  # the per-key counters, at most a sync interval behind
            for allowance in list(self.limits.allowances.values()):
                allowance.next_period()
            if await self.exchange_soon(full=True) and self._spool_due:
                await self._fold_spools()

    # ------------------------------------------------------------------ exchanges

    def exchange_soon(self, include: Allowance | None = None, full: bool = False) -> Awaitable[bool]:
        """An exchange that starts from now on (joining one not started yet) for `include`, or `full`
        (usage, every allowance, the keys' revision); its answer: whether it reached the store."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self._next_full = self._next_full or full
        if include is not None:
            self._next_only[id(include)] = include
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return asyncio.shield(self._next)

    async def _run(self) -> None:
        while self._next is not None:
            future, full, only = self._next, self._next_full, list(self._next_only.values())
            self._next, self._next_full, self._next_only = None, False, {}
            try:
                reached = await self._exchange(full, only=only)
            except BaseException:
                future.set_result(False)
                raise
            future.set_result(reached)

    async def _exchange(self, full: bool, final: bool = False, only: Sequence[Allowance] = ()) -> bool:
        """One exchange with the store; False when it could not be reached (nothing is lost)."""
        plans = self.limits.plans(None if full else only)
        if not full and not final and not plans:
            return True  # nothing to tell the store (a slot taken again before it was given back)
        rows = self.usage.unwritten(self.holder) if full else []
        lease = self.settings.keys_lease_seconds
        steady = self._connected_since is not None and time.monotonic() - self._connected_since > lease
        stage = Stage()
        started = time.monotonic()
        try:
            synced = await self.database.run(
                self._transaction, [plan for _, plan in plans], rows, full, steady, final, stage
            )
        except Exception as exc:
            if not stage.committing:  # surely not stored: what was being given back is still held
                for allowance, _ in plans:
                    allowance.failed()
            self._store_failed(exc)
            return False
        if self._connected_since is None:
            log.info("the database is reachable again; usage and allowances written")
            self._spool_due = True  # a process that stopped meanwhile may have spooled its usage
            self._connected_since = time.monotonic()
        self._holds_until(started)
        self.limits.processes = synced.exchanged.processes
        for (allowance, plan), outcome in zip(plans, synced.exchanged.outcomes, strict=True):
            allowance.applied(plan, outcome)
        self._contended(synced.exchanged.contended)
        if synced.exchanged.reclaimed:
            log.warning("this process was out of touch with the database longer than the lease "
                        "(GATEWAY_KEYS_LEASE_SECONDS); the others reclaimed its allowances")  # fmt: skip
        self.usage.stored(rows)
        if synced.keys is not None:
            self._adopt(synced.keys, synced.revision)
        return True

    def _transaction(
        self,
        plans: Sequence[ledger.Plan],
        rows: list[dict[str, Any]],
        follow: bool,
        steady: bool,
        final: bool,
        stage: Stage,
    ) -> Synced:
        """The exchange's one transaction (on a store thread)."""
        now_ms = int(time.time() * 1000)
        lapse = int(self.settings.keys_lease_seconds * 1000) if steady else None
        since = now_ms - int(CONTENDED_SECONDS * 1000)
        keys = None
        with self.database.engine.connect() as connection:
            transaction = connection.begin()
            lease_ms = int(self.settings.keys_lease_seconds * 1000)
            exchanged = ledger.exchange(
                connection, self.holder, now_ms, plans, lapse, self.limits.bucket_now, since, lease_ms
            )
            write_usage(connection, rows)
            current = revision(connection, key_rows.TOPIC) if follow else self.directory.revision
            if follow and current != self.directory.revision:
                keys = [from_row(row) for row in key_rows.all_keys(connection)]
            if final:
                ledger.release(connection, self.holder, now_ms)
            stage.committing = True  # from here on, a failure may or may not have stored it all
            transaction.commit()
        return Synced(exchanged, keys, current)

    def _contended(self, contended: frozenset[tuple[str, str]]) -> None:
        """Keys another process was refused lately: keep only what is used, and give the rest back now."""
        if not contended:
            return
        now = time.time()
        for (key_id, resource), allowance in self.limits.allowances.items():
            if (key_id, resource.value) not in contended:
                continue
            allowance.contended_until, allowance.calm = now + CONTENDED_SECONDS, False
            if allowance.held - allowance.pending > allowance.cushion(now) and not allowance.nudged:
                allowance.nudged = True
                asyncio.get_running_loop().call_soon(self.exchange_soon, allowance)

    def _holds_until(self, started: float) -> None:
        """An exchange that began at `started` (monotonic) renewed the lease: what is held is this
        process's till then, whatever the wall clock does meanwhile."""
        self.limits.holds_until = started + LEASE_USED * self.settings.keys_lease_seconds

    @property
    def reachable(self) -> bool:
        """Whether the last exchange reached the store (else a key this process does not know may be a
        new one, and cannot be checked)."""
        return self._connected_since is not None

    def holds_keys(self) -> bool:
        """Whether this process may serve runtime keys from what it knows of them: within its hold (the
        part of the lease since its last exchange that reached the store), as for their limits; past it a
        revocation made elsewhere may have gone unseen for longer than the docs promise."""
        return self.limits.usable()

    def _store_failed(self, exc: Exception) -> None:
        self.metrics.store_errors.inc()
        self._connected_since = None
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY:
            self._last_error_log = now
            log.warning("the database is unreachable (%s): serving known keys from what this process holds; "
                        "%d usage row(s) waiting", _short(exc), self.usage.waiting)  # fmt: skip

    def _load(self) -> tuple[list[StoredKey], int]:
        with self.database.transaction() as connection:
            return [from_row(row) for row in key_rows.all_keys(connection)], revision(
                connection, key_rows.TOPIC
            )

    def _adopt(self, keys: list[StoredKey], current: int) -> None:
        """The store's keys, as of revision `current`, replace the ones held."""
        before = self.directory.by_id
        self.directory.replace(keys, current)
        self._refresh(before)

    def _refresh(self, before: dict[str, StoredKey]) -> None:
        """After the keys changed: allowances of revoked keys go back, their metric series go."""
        live = {key.id: key.policy for key in self.directory.by_id.values() if not key.revoked}
        self.limits.retire(live.get)
        self.limits.prepare(self.directory.by_id.values())
        for key in self.directory.by_id.values():
            if key.revoked and not (before.get(key.id) and before[key.id].revoked):
                self.metrics.forget(key.id)
                with contextlib.suppress(KeyError):
                    self.metrics.info.remove(key.id, key.name)
            elif not key.revoked:
                self.metrics.child(self.metrics.info, key.id, key.name).set(1)

    # ------------------------------------------------------------------ the request path

    def find(self, digest: bytes) -> StoredKey | None:
        """The runtime key whose SHA-256 is `digest`."""
        return self.directory.find(digest)

    @property
    def closed(self) -> bool:
        """Whether the store holds keys (then every client route needs one)."""
        return self.directory.closed

    async def admit(self, key: StoredKey, counted: bool) -> Allowance | None:
        """A runtime key's rate and, for a counted request, its slot (give it back with `finish`)."""
        policy = key.policy
        try:
            if policy.rate_limit:
                await self.limits.hit(key)
            if counted and policy.max_concurrent:
                return await self.limits.hold_slot(key)
        except GatewayError as exc:
            self.refused(key.id, exc)
            raise
        return None

    def refused(self, key_id: str, error: GatewayError) -> None:
        """Count a refusal by a key's own limit or policy."""
        reason = (error.code or error.error_type).removesuffix("_exceeded").removesuffix("_not_allowed")
        self.metrics.child(self.metrics.refusals, key_id, reason).inc()

    def finish(self, key_id: str, slot: Allowance | None, record: RequestRecord | None) -> None:
        """A request of a key ended: its slot comes back, it counts in the key's usage."""
        if slot is not None:
            self.limits.release_slot(slot)
            if not slot.nudged:  # give it back soon if the key's next request does not take it
                slot.nudged = True
                asyncio.get_running_loop().call_later(SLOT_LINGER_SECONDS + 0.05, self.exchange_soon, slot)
        if record is None:
            return
        error = record.error_type is not None
        self.usage.count(key_id, record.model, error)
        counts = self.metrics.unreported(key_id)  # on the counters at the next report
        counts[REQUESTS] += 1
        counts[ERRORS] += error

    def charge(
        self, caller: Caller, model: str, prompts: Sequence[int] | None, max_tokens: int | None, n: int,
        context: int,
    ) -> Charge | None:  # fmt: skip
        """What a request may cost its key (None without a key)."""
        if caller.key_id is None:
            return None
        prompt_tokens = sum(prompts) if prompts is not None else None
        return Charge(caller, model, prompt_tokens, most_tokens(prompts, max_tokens, n, context))

    async def reserve(self, charge: Charge | None) -> None:
        """Hold what the request may use in its key's budget (429 with the numbers if it does not fit)."""
        if charge is None:
            return
        try:
            await self.limits.reserve(charge)
        except GatewayError as exc:
            if charge.caller.key_id is not None:
                self.refused(charge.caller.key_id, exc)
            raise

    def settle(self, charge: Charge | None, record: RequestRecord) -> None:
        """The request's end, however it ended: what it used is spent and counted in the key's usage."""
        if charge is None or charge.settled or charge.caller.key_id is None:
            return
        tokens_in, tokens_out = used_by(record, charge)
        self.limits.settle(charge, tokens_in + tokens_out)
        if charge.reserved and tokens_in + tokens_out > charge.reserved:
            log.warning("a request used %d tokens, more than the %d it reserved", tokens_in + tokens_out,
                        charge.reserved)  # fmt: skip
        key_id = charge.caller.key_id
        self.usage.add_tokens(key_id, charge.model, tokens_in, tokens_out)
        counts = self.metrics.unreported(key_id)
        counts[TOKENS_IN] += tokens_in
        counts[TOKENS_OUT] += tokens_out

    # ------------------------------------------------------------------ the operator's

    async def create(self, name: str, policy: KeyPolicy) -> tuple[str, StoredKey]:
        """A new key (its secret, shown once, and its record), in effect here at once."""
        secret, record = new_key(name, policy, datetime.now(UTC))
        try:
            await self._write(key_rows.insert_key, as_row(record), self.settings.max_keys)
        except key_rows.KeysFull as full:
            raise TooManyKeys(full.live, self.settings.max_keys) from None
        self.directory.put(record)
        self._refresh({})
        return secret, record

    async def revoke(self, key_id: str) -> StoredKey | None:
        """Revoke a key (here at once; elsewhere at the next look); None when there is no such key."""
        row = await self._write(key_rows.revoke_key, key_id, datetime.now(UTC))
        if row is None:
            return None
        before = dict(self.directory.by_id)
        record = from_row(row)
        self.directory.put(record)
        self._refresh(before)
        return record

    async def stored_keys(self) -> list[StoredKey]:
        """Every key the store holds, revoked ones too."""
        rows = await self._read(key_rows.all_keys)
        return [from_row(row) for row in rows]

    async def budget_statuses(self, keys: Sequence[StoredKey]) -> dict[str, tuple[int, int]]:
        """(used in the current period, reserved) of each budget of `keys`, every process together (one
        read of the store for them all)."""
        now = time.time()
        windows = {key.id: key.policy.token_budget.bucket(now) for key in keys if key.policy.token_budget}
        if not windows:
            return {}
        found: dict[str, tuple[int, int]] = await self._read(ledger.statuses, "tokens", windows)
        return found

    async def usage_rows(
        self, first: date | None, last: date | None, key_id: str | None, model: str | None
    ) -> list[dict[str, Any]]:
        """Usage per key, model and day (every process's rows added), from the store."""
        rows: list[dict[str, Any]] = await self._read(read_usage, first, last, key_id, model)
        return rows

    async def _write(self, work: Any, *args: Any) -> Any:
        try:
            return await self.database.run(self._in_transaction, work, *args)
        except key_rows.KeysFull:
            raise
        except Exception as exc:
            log.warning("the database is unreachable for an operator request: %s", _short(exc))
            raise StoreUnavailable() from exc

    _read = _write

    def _in_transaction(self, work: Any, *args: Any) -> Any:
        with self.database.transaction() as connection:
            return work(connection, *args)


def used_by(record: RequestRecord, charge: Charge) -> tuple[int, int]:
    """(tokens in, tokens out) a request used: what the worker reported; without a report, what the
    gateway saw (its prompt count, one token per streamed event) if a worker was reached; else none."""
    if record.prompt_tokens or record.completion_tokens:
        return max(0, record.prompt_tokens), max(0, record.completion_tokens)
    if not record.sent:
        return 0, 0  # never sent to a worker (refused, queued then cancelled, its adapter not loaded)
    if charge.prompt_tokens is None:
        return charge.most, 0  # nothing counted: the most it could have been
    return max(0, charge.prompt_tokens), record.token_events


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
