"""Usage per key, served model and day (UTC), counted in memory on the request's path and written to the
store in batches (`service.core.tenants`, about once a second, and when the gateway stops).

This process's totals are kept whole until written: a write that fails is simply made again with the
newer totals, and one that succeeded without the process hearing so counts nothing twice (the rows hold
absolute totals). Memory is bounded by the rows waiting (keys x models x days): past
GATEWAY_USAGE_MAX_ROWS, a new row's counts are dropped and counted in `gateway_usage_dropped_total`.

Per-key Prometheus counters go with it; their series are one per key (and direction, reason) that this
process has served since it started: bounded by the number of keys. A request's counts are added to
plain lists on its path and reach the counters in one batch (`KeyMetrics.report`) at each of the
process's key syncs (every GATEWAY_KEYS_SYNC_INTERVAL) and when it stops, and with one process at each
scrape (never behind then); with several processes (prometheus-client's multiprocess mode merges their
files, not this registry) a scrape shows each process's counts at most one sync interval behind.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

Row = tuple[str, str, date]  # key id, served model, day
REQUESTS, ERRORS, TOKENS_IN, TOKENS_OUT = range(4)


def today(now: float) -> date:
    """The UTC day of `now` (seconds since the epoch)."""
    return _day(int(now // 86_400))


@functools.lru_cache(maxsize=4)
def _day(number: int) -> date:
    """Day `number` since the epoch (made once: every request asks for today)."""
    return datetime.fromtimestamp(number * 86_400, UTC).date()


class KeyMetrics:
    """`gateway_key_*`: requests, errors, tokens and refusals per key id (and the keys' names)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # key id -> requests, errors, tokens in, out, counted since the last report (list additions on
        # the request's path instead of counter increments, each a lock and two checks)
        self._unreported: dict[str, list[int]] = {}
        # Registered before the counters: a scrape collects in registration order, so it reports first.
        registry.register(_Report(self.report))
        self.requests = Counter("gateway_key_requests", "Requests per API key", ["key"], registry=registry)
        self.errors = Counter(
            "gateway_key_errors", "Requests per API key answered with an error", ["key"], registry=registry
        )
        self.tokens = Counter(
            "gateway_key_tokens", "Tokens per API key (in: prompts, out: generated)", ["key", "direction"],
            registry=registry,
        )  # fmt: skip
        self.refusals = Counter(
            "gateway_key_refusals", "Requests refused by a key's own limit or policy",
            ["key", "reason"], registry=registry,
        )  # fmt: skip
        self.info = Gauge(
            "gateway_key_info", "1 for every key managed at runtime and not revoked (its name)",
            ["key", "name"], registry=registry, multiprocess_mode="liveall",
        )  # fmt: skip
        self.dropped = Counter(
            "gateway_usage_dropped",
            "Usage rows dropped: more were waiting for the database than GATEWAY_USAGE_MAX_ROWS",
            registry=registry,
        )
        self.store_errors = Counter(
            "gateway_store_errors", "Failed exchanges with the database (keys, allowances, usage)",
            registry=registry,
        )  # fmt: skip
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def unreported(self, key_id: str) -> list[int]:
        """The key's counts not on its counters yet, to add a request's to (`REQUESTS`, `ERRORS`...)."""
        found = self._unreported.get(key_id)
        if found is None:
            found = self._unreported[key_id] = [0, 0, 0, 0]
        return found

    def report(self) -> None:
        """Add the counts made since the last report to the counters."""
        unreported, self._unreported = self._unreported, {}
        for key_id, (requests, errors, tokens_in, tokens_out) in unreported.items():
            if requests:
                self.child(self.requests, key_id).inc(requests)
            if errors:
                self.child(self.errors, key_id).inc(errors)
            if tokens_in:
                self.child(self.tokens, key_id, "in").inc(tokens_in)
            if tokens_out:
                self.child(self.tokens, key_id, "out").inc(tokens_out)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (one lookup per request)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def forget(self, key_id: str) -> None:
        """A revoked key: its series go (new ones would come back only if it served again). Its counts
        not reported yet are reported first: with several processes a series is never removed from the
        files they write, so what it served before its revocation must be there."""
        self.report()
        for metric, labels in list(self._children):
            if labels and labels[0] == key_id:
                del self._children[(metric, labels)]
                metric.remove(*labels)


class _Report:
    """A collector that only reports a `KeyMetrics`' pending counts when the registry is scraped."""

    def __init__(self, report: Callable[[], None]) -> None:
        self.report = report

    def describe(self) -> list[Metric]:
        return []  # no series of its own (and registering it must not report)

    def collect(self) -> list[Metric]:
        self.report()
        return []


class UsageBook:
    """This process's usage totals, and which of them the store does not have yet."""

    def __init__(
        self, max_rows: int, dropped: Callable[[], None], clock: Callable[[], float] = time.time
    ) -> None:
        self.max_rows = max_rows
        self.dropped = dropped
        self.clock = clock
        self.totals: dict[Row, list[int]] = {}
        self.written: dict[Row, tuple[int, ...]] = {}
        # Today's rows by (key, model): two lookups per request without making the day's date. Rows of
        # today are never forgotten (`stored` forgets past days'), so what this holds stays in `totals`.
        self._day_number = -1
        self._today: dict[tuple[str, str], list[int]] = {}

    def _row(self, key_id: str, model: str) -> list[int] | None:
        number = int(self.clock() // 86_400)
        if number != self._day_number:
            self._day_number, self._today = number, {}
        found = self._today.get((key_id, model))
        if found is not None:
            return found
        row = (key_id, model, _day(number))
        found = self.totals.get(row)
        if found is None:
            if len(self.totals) >= self.max_rows:
                self.dropped()
                return None
            found = self.totals[row] = [0, 0, 0, 0]
        self._today[(key_id, model)] = found
        return found

    def count(self, key_id: str, model: str, error: bool) -> None:
        """One request of a key to a model (`error`: answered with an error)."""
        found = self._row(key_id, model)
        if found is not None:
            found[REQUESTS] += 1
            found[ERRORS] += error

    def add_tokens(self, key_id: str, model: str, tokens_in: int, tokens_out: int) -> None:
        """Tokens a request of a key used."""
        found = self._row(key_id, model)
        if found is not None:
            found[TOKENS_IN] += tokens_in
            found[TOKENS_OUT] += tokens_out

    def unwritten(self, holder: str) -> list[dict[str, Any]]:
        """Rows whose totals the store does not have yet, as `usage` rows."""
        return [
            {"key_id": key_id, "model": model, "day": day, "holder": holder, "requests": counts[REQUESTS],
             "errors": counts[ERRORS], "tokens_in": counts[TOKENS_IN], "tokens_out": counts[TOKENS_OUT]}
            for (key_id, model, day), counts in self.totals.items()
            if self.written.get((key_id, model, day)) != tuple(counts)
        ]  # fmt: skip

    def stored(self, rows: list[dict[str, Any]]) -> None:
        """The store has `rows`; rows of past days that it has whole are forgotten."""
        for row in rows:
            counts = (row["requests"], row["errors"], row["tokens_in"], row["tokens_out"])
            self.written[(row["key_id"], row["model"], row["day"])] = counts
        yesterday = today(self.clock()) - timedelta(days=1)
        for place in [p for p in self.totals if p[2] < yesterday]:
            if self.written.get(place) == tuple(self.totals[place]):
                del self.totals[place]
                del self.written[place]

    @property
    def waiting(self) -> int:
        """Rows the store does not have whole yet."""
        return sum(1 for place, counts in self.totals.items() if self.written.get(place) != tuple(counts))
