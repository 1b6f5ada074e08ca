"""Prometheus metrics: the names dashboards and alerts rely on, one registry per app.

Totals are Counters and latencies `_seconds` Histograms with explicit buckets (1 ms to 10 min), so
several gateway processes or pods aggregate with `sum()`/`histogram_quantile()`. With
`PROMETHEUS_MULTIPROC_DIR` set, prometheus-client's multiprocess mode merges processes on one host.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.ops.logs import DropCount

# 1 ms .. 10 min, roughly x2.5 per step: fine where people look (10 ms - 10 s), bounded elsewhere.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# The gateway's own share is usually well under a millisecond: three finer buckets below 1 ms.
OWN_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def observe_many(histogram: Any, value: float, count: int) -> None:
    """`count` observations of `value` at once (tokens that reached the client in one write).
    prometheus-client observes one value per call; this adds to the same bucket and sum it would,
    falling back to one call per observation if its internals ever change."""
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is None or total is None or bounds is None:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect.bisect_left(bounds, value)].inc(count)


class WorkerRow(NamedTuple):
    """One worker as the metrics show it; engine figures are None when its `/metrics` did not say."""

    model: str
    worker: str
    up: bool
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None


# Every worker, read at scrape time (the pools publish them).
WorkerRows = Callable[[], Iterable[WorkerRow]]

# (name, help, field of WorkerRow, family type) of the engine figures re-exported per worker.
ENGINE_FIGURES = (
    ("gateway_worker_requests_running", "Requests the worker's engine is running (its own metric)",
     "running", GaugeMetricFamily),
    ("gateway_worker_requests_waiting", "Requests waiting in the worker's engine (its own metric)",
     "waiting", GaugeMetricFamily),
    ("gateway_worker_kv_cache_usage", "Fraction of the worker's KV cache in use (its own metric)",
     "kv_cache_usage", GaugeMetricFamily),
    ("gateway_worker_prefix_cache_queries", "Prompt tokens the worker looked up in its prefix cache",
     "prefix_cache_queries", CounterMetricFamily),
    ("gateway_worker_prefix_cache_hits", "Prompt tokens the worker found in its prefix cache",
     "prefix_cache_hits", CounterMetricFamily),
)  # fmt: skip


class WorkerHealthCollector(Collector):
    """`gateway_worker_up` and the engines' own load and prefix-cache figures, read from the pools
    at scrape time (no state to keep in sync)."""

    def __init__(self, rows: WorkerRows) -> None:
        self._rows = rows

    def collect(self) -> Iterable[Metric]:
        rows = list(self._rows())
        up = GaugeMetricFamily("gateway_worker_up", "1 healthy, 0 not", labels=["model", "worker"])
        for row in rows:
            up.add_metric([row.model, row.worker], 1.0 if row.up else 0.0)
        yield up
        for name, text, attribute, family_type in ENGINE_FIGURES:
            family = family_type(name, text, labels=["model", "worker"])
            for row in rows:
                value = getattr(row, attribute)
                if value is not None:
                    family.add_metric([row.model, row.worker], float(value))
            yield family


class LogDropsCollector(Collector):
    """`gateway_log_records_dropped_total`: log records the bounded log queue had no room for."""

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "gateway_log_records_dropped", "Log records dropped because the log writer fell behind"
        )
        family.add_metric([], float(DropCount.value))
        yield family


class Metrics:
    """Every gateway metric, registered in its own registry (tests build many apps)."""

    def __init__(self, worker_rows: WorkerRows) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._health = WorkerHealthCollector(worker_rows)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        registry = self.registry
        self.requests = Counter(
            "gateway_requests", "Finished requests", ["endpoint", "model", "status"], registry=registry
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Arrival to last byte", ["endpoint", "model", "status"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Arrival to first generated token sent to the client",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds", "Gap between streamed tokens", ["endpoint", "model"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.own_time = Histogram(
            "gateway_own_seconds",
            "Time a request spent in the gateway itself: arrival to upstream send, between attempts, and "
            "after the worker's last byte; the request's duration minus gateway_upstream_seconds",
            ["endpoint", "model"], buckets=OWN_TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_time = Histogram(
            "gateway_upstream_seconds", "Time waiting on workers: each attempt's send to its last byte",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds", "Time waiting for a worker slot", ["model"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.render = Histogram(
            "gateway_template_render_seconds", "Chat template rendering and tokenizing", ["model"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens", ["model"], registry=registry)
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Generated tokens", ["model"], registry=registry
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Admitted and not yet finished", ["model"],
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.disconnects = Counter(
            "gateway_client_disconnects",
            "Clients gone before the end",
            ["endpoint", "model"],
            registry=registry,
        )
        self.errors = Counter(
            "gateway_errors", "Failures by OpenAI error type", ["endpoint", "type"], registry=registry
        )
        self.routing_decisions = Counter(
            "gateway_routing_decisions", "Replica choices by policy and reason",
            ["model", "policy", "reason"], registry=registry,
        )  # fmt: skip
        self.routing_prefix_tokens = Counter(
            "gateway_routing_prefix_tokens", "Prompt tokens (whole KV blocks) hashed for prefix routing",
            ["model"], registry=registry,
        )  # fmt: skip
        self.routing_prefix_hit_tokens = Counter(
            "gateway_routing_prefix_hit_tokens",
            "Of those, tokens the chosen replica likely had cached (the gateway's estimate)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.adapter_loads = Counter(
            "gateway_adapter_loads", "Adapter loads onto workers by outcome: loaded, already_loaded, failed",
            ["model", "adapter", "outcome"], registry=registry,
        )  # fmt: skip
        self.adapter_load_time = Histogram(
            "gateway_adapter_load_seconds", "Time to load an adapter onto a worker, whatever the outcome",
            ["model", "adapter"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.auth_failures = Counter(
            "gateway_auth_failures", "Requests with a missing or wrong API key", registry=registry
        )
        self.auth_throttled = Counter(
            "gateway_auth_throttled",
            "Requests refused without a key check: their address sent too many wrong keys",
            registry=registry,
        )
        registry.register(self._health)
        registry.register(LogDropsCollector())

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: label sets are few (endpoints x models x statuses),
        and prometheus-client re-validates and locks on every `labels()` call."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def forget_model(self, name: str) -> None:
        """Drop every series labelled with `name` as its model or adapter (a removed adapter: series of
        names that come and go would otherwise pile up for the life of the process). Not with several
        processes: prometheus-client cannot remove series from its multiprocess files (kept until restart)."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            return
        for metric, values in list(self._children):
            labels = dict(zip(getattr(metric, "_labelnames", ()), values, strict=False))
            if name in (labels.get("model"), labels.get("adapter")):
                del self._children[(metric, values)]
                with contextlib.suppress(KeyError):
                    metric.remove(*values)

    def exposition(self) -> bytes:
        """The text format for GET /metrics (merged across processes in multiprocess mode)."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            merged.register(self._health)
            merged.register(LogDropsCollector())
            return generate_latest(merged)
        return generate_latest(self.registry)
