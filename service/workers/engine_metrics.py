"""What a worker's own Prometheus `/metrics` says about its load and its prefix cache.

vLLM renamed some of these over time; both names are read: `vllm:kv_cache_usage_perc` (was
`vllm:gpu_cache_usage_perc`) and `vllm:prefix_cache_{queries,hits}` (were `vllm:gpu_prefix_cache_*`).
Samples of several engines (data parallel) add up; the KV usage is the fullest engine's.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.workers.transport import Transport
from service.workers.worker import EngineLoad, Worker

RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
CACHE_CONFIG = ("vllm:cache_config_info",)
# A gauge whose value is when it was set and whose labels name the adapters running and waiting then; the
# newest sample is the current one.
LORA_INFO = ("vllm:lora_requests_info",)
WANTED = RUNNING + WAITING + KV_USAGE + PREFIX_QUERIES + PREFIX_HITS + CACHE_CONFIG + LORA_INFO


def parse_engine_load(text: str) -> EngineLoad:
    """The load figures in a vLLM `/metrics` exposition (lines of other metrics are not parsed)."""
    kept = "\n".join(line for line in text.splitlines() if line.startswith(WANTED))
    values: dict[str, list[float]] = {}
    block_size: int | None = None
    lora: tuple[float, dict[str, str]] | None = None  # the newest lora_requests_info sample
    for family in text_string_to_metric_families(kept + "\n"):
        for sample in family.samples:
            values.setdefault(sample.name, []).append(sample.value)
            if sample.name in CACHE_CONFIG and sample.labels.get("block_size", "").isdigit():
                block_size = int(sample.labels["block_size"])
            if sample.name in LORA_INFO and (lora is None or sample.value >= lora[0]):
                lora = (sample.value, sample.labels)

    def total(names: tuple[str, ...]) -> float | None:
        found = [sum(values[name]) for name in names if name in values]
        return found[0] if found else None

    usage = [max(values[name]) for name in KV_USAGE if name in values]
    return EngineLoad(
        running=total(RUNNING),
        waiting=total(WAITING),
        kv_cache_usage=usage[0] if usage else None,
        prefix_cache_queries=total(PREFIX_QUERIES),
        prefix_cache_hits=total(PREFIX_HITS),
        block_size=block_size,
        lora_running=_names(lora[1].get("running_lora_adapters")) if lora else frozenset(),
        lora_waiting=_names(lora[1].get("waiting_lora_adapters")) if lora else frozenset(),
    )


def _names(listed: str | None) -> frozenset[str]:
    """Adapter names as vLLM lists them in a label: comma-separated."""
    return frozenset(name for name in (listed or "").split(",") if name)


async def read_engine_load(transport: Transport, worker: Worker) -> None:
    """Refresh `worker.engine` from its `/metrics`."""
    worker.observe_engine(parse_engine_load(await transport.get_text(worker, "/metrics")))
