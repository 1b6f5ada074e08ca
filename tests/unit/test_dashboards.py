"""The Grafana dashboard and Prometheus files are valid and only name metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from service.ops.metrics import Metrics
from service.ops.settings import ModelKind, ModelSpec
from service.workers.pool import ModelPool, Worker
from service.workers.worker import EngineLoad

ROOT = Path(__file__).parents[2]
METRIC_NAME = re.compile(r"\b(gateway_[a-z_]+)\b")


def exported_names() -> set[str]:
    """Every sample name the gateway's registry can produce (with one of each label set touched)."""
    worker = Worker("m", "http://w")
    worker.engine = EngineLoad(running=1, waiting=0, kv_cache_usage=0.5, prefix_cache_queries=10,
                               prefix_cache_hits=5, block_size=16)  # fmt: skip
    pool = ModelPool(ModelSpec(name="m", kind=ModelKind.BASE, source="/m"), [worker])
    metrics = Metrics(lambda: pool.health_rows())
    metrics.requests.labels("chat", "m", "200")
    for histogram in (metrics.duration,):
        histogram.labels("chat", "m", "200")
    for histogram in (metrics.ttft, metrics.itl, metrics.own_time, metrics.upstream_time):
        histogram.labels("chat", "m")
    for per_model in (
        metrics.queue_wait,
        metrics.render,
        metrics.prompt_tokens,
        metrics.completion_tokens,
        metrics.in_flight,
    ):
        per_model.labels("m")
    metrics.disconnects.labels("chat", "m")
    metrics.errors.labels("chat", "timeout")
    metrics.routing_decisions.labels("m", "prefix", "prefix_match")
    metrics.routing_prefix_tokens.labels("m")
    metrics.routing_prefix_hit_tokens.labels("m")
    metrics.adapter_loads.labels("m", "a", "loaded")
    metrics.adapter_load_time.labels("m", "a")
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "llm-gateway.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_exports_exactly_the_documented_metric_names() -> None:
    families = {re.sub(r"_(bucket|count|sum|created|total)$", "", name) for name in exported_names()}
    assert families == {
        "gateway_requests",
        "gateway_request_duration_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway_inter_token_latency_seconds",
        "gateway_queue_wait_seconds",
        "gateway_template_render_seconds",
        "gateway_prompt_tokens",
        "gateway_completion_tokens",
        "gateway_requests_in_flight",
        "gateway_worker_up",
        "gateway_client_disconnects",
        "gateway_errors",
        "gateway_log_records_dropped",
        "gateway_own_seconds",
        "gateway_upstream_seconds",
        "gateway_routing_decisions",
        "gateway_routing_prefix_tokens",
        "gateway_routing_prefix_hit_tokens",
        "gateway_worker_requests_running",
        "gateway_worker_requests_waiting",
        "gateway_worker_kv_cache_usage",
        "gateway_worker_prefix_cache_queries",
        "gateway_worker_prefix_cache_hits",
        "gateway_auth_failures",
        "gateway_auth_throttled",
        "gateway_adapter_loads",
        "gateway_adapter_load_seconds",
    }


def test_dashboard_is_valid_and_its_queries_name_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "llm-gateway.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exported = exported_names()
    exprs = dashboard_exprs()
    named = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert named, "no gateway metric in the dashboard"
    assert named <= exported, named - exported
    wanted = [
        "gateway_requests_total",
        "gateway_time_to_first_token_seconds_bucket",
        "gateway_worker_up",
        "gateway_request_duration_seconds_bucket",
        "gateway_inter_token_latency_seconds_bucket",
        "gateway_completion_tokens_total",
        "gateway_requests_in_flight",
        "gateway_errors_total",
        "gateway_routing_decisions_total",
        "gateway_routing_prefix_hit_tokens_total",
        "gateway_worker_prefix_cache_hits_total",
        "gateway_worker_kv_cache_usage",
        "gateway_worker_requests_waiting",
        "gateway_own_seconds_bucket",
        "gateway_upstream_seconds_bucket",
        "gateway_adapter_loads_total",
        "gateway_adapter_load_seconds_bucket",
    ]
    assert set(wanted) <= named


def test_prometheus_config_and_alerts_name_exported_metrics() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    named = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert named and named <= exported_names()


def test_the_observability_page_lists_every_metric() -> None:
    readme = (ROOT / "docs" / "operations" / "observability.md").read_text()
    names = {name for name in exported_names() if not name.endswith("_created")}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}
    assert all(f"`{name}`" in readme for name in families), [n for n in families if f"`{n}`" not in readme]
