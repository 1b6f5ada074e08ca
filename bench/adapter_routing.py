"""Adapter routing on real workers: two built-in Gemma 3 270M replicas (one core each) with LoRA enabled and
fewer adapter slots than adapters (`--max-loras 2 --max-cpu-loras 3`, 6 adapters), a Zipf-like mix of
requests over the adapters plus some base-model requests. Two gateways front the same two workers, both
`least_outstanding`: one with adapter affinity (the default), one without (`adapter_affinity: false`: an
adapter is loaded wherever a request lands). Alternating rounds; per mode: latency p50/p90, time to first
token p50, requests/s, output tokens/s, the gateway's own adapter loads, and how often vLLM brought an
adapter into its CPU cache (read from disk) or into a batch slot (from its LoRA manager's debug log).

Each mode serves the same six folders under names of its own (`affinity-a0`, `policy-a0`, ...), so one
gateway's loads never count as the other's and both meet the same engines, whose adapter caches the other
mode's round has just filled. The adapters are random-initialised rank-8 LoRAs (nonzero B, each its own
seed), made once with peft under ~/.cache/llm-gateway/adapters/bench-routing-*; never in the repository.
Real vLLM workers: run it under `flock /tmp/e2e.lock`.

    .venv/bin/python -m bench.adapter_routing            # full run (~15 min on 2 busy cores)
    .venv/bin/python -m bench.adapter_routing --quick    # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ROOT, console, gateway_env, percentile, save, stop_all, table, wait_http
from service.ops.settings import Settings, default_models
from service.workers.supervisor import free_port, launch_plan

MODEL = "gemma-3-270m"
MODES = ("affinity", "policy")  # policy: least_outstanding without adapter affinity
ADMIN_KEY = "bench-admin"
ADAPTERS = Path.home() / ".cache" / "llm-gateway" / "adapters"
# Only the LoRA manager speaks at DEBUG: its "Adding lora" (read from disk into the CPU cache) and
# "Activating LoRA" (into a batch slot) lines are what is counted.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(asctime)s %(name)s: %(message)s"}},
    "handlers": {
        "out": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "plain"}
    },
    "loggers": {
        "vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
        "vllm.lora.model_manager": {"level": "DEBUG"},
    },
}
WORDS = ["river", "market", "winter", "engine", "garden", "letter", "station", "forest", "harbour", "signal",
         "morning", "village", "copper", "lantern", "orchard", "journey"]  # fmt: skip


def make_adapters(count: int, base: Path) -> list[Path]:
    """`count` distinct random-initialised rank-8 LoRAs of the Gemma (made once, then reused)."""
    folders = [ADAPTERS / f"bench-routing-{i}" for i in range(count)]
    missing = [f for f in folders if not (f / "adapter_model.safetensors").exists()]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        for folder in missing:
            torch.manual_seed(folders.index(folder))
            # init_lora_weights=False: B is random too (peft's default zeroes it: the adapter would be a no-op)
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                init_lora_weights=False)  # fmt: skip
            tuned = get_peft_model(model, config)
            tuned.save_pretrained(str(folder))
            model = tuned.unload()
    return folders


def start_workers(max_loras: int, max_cpu_loras: int, folder: Path) -> tuple[list[subprocess.Popen[bytes]], list[Path], list[str]]:  # fmt: skip
    """Two Gemma workers with LoRA enabled, one core each, as the gateway launches them; their logs."""
    settings = Settings()
    [spec] = [model for model in default_models() if model.name == MODEL]
    logging_config = folder / "vllm-logging.json"
    logging_config.write_text(json.dumps(LOGGING))
    spec = spec.model_copy(update={"lora": True, "max_loras": max_loras, "max_cpu_loras": max_cpu_loras,
                                   "max_lora_rank": 8,
                                   "engine_env": {**spec.engine_env, "VLLM_LOGGING_CONFIG_PATH": str(logging_config)}})  # fmt: skip
    processes, logs, urls = [], [], []
    for replica, core in enumerate(("0", "1")):
        port = free_port("127.0.0.1")
        plan = launch_plan(spec, settings, port, core, replica)
        logs.append(folder / f"worker-{replica}.log")
        with logs[-1].open("wb") as log:
            processes.append(subprocess.Popen(plan.argv, env=plan.env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
    for process, url in zip(processes, urls, strict=True):
        wait_http(f"{url}/health", 900, process)
    return processes, logs, urls


def start_gateway(mode: str, workers: list[str], adapters: list[Path]) -> tuple[subprocess.Popen[bytes], str]:
    """A least_outstanding gateway over `workers` serving `adapters` as `<mode>-a<i>`, with or without
    adapter affinity."""
    port = free_port("127.0.0.1")
    model = {"name": MODEL, "kind": "base", "tokenizer": str(Settings().model_dir(MODEL)), "urls": workers,
             "routing": "least_outstanding", "adapter_affinity": mode == "affinity",
             "adapters": [{"name": f"{mode}-a{i}", "path": str(p)} for i, p in enumerate(adapters)]}  # fmt: skip
    env = gateway_env()
    env.update(GATEWAY_PORT=str(port), GATEWAY_MODELS=json.dumps([model]), GATEWAY_PROCESSES="1",
               GATEWAY_LOG_LEVEL="error", GATEWAY_HEALTH_INTERVAL="1", GATEWAY_ADMIN_KEYS=ADMIN_KEY)  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", 180, process)
    return process, url


def workload(count: int, adapters: int, base_share: float, zipf: float, seed: int) -> list[int | None]:
    """Which adapter each request names (None: the base model): Zipf-like over the adapters."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** zipf for rank in range(adapters)]
    return [
        None if rng.random() < base_share else rng.choices(range(adapters), weights)[0] for _ in range(count)
    ]


def prompt(seed: int) -> str:
    """A short prose prompt of its own."""
    rng = random.Random(seed)
    return "Notes on the " + " ".join(rng.choice(WORDS) for _ in range(24)) + ". In summary,"


async def run_round(url: str, mode: str, picks: list[int | None], concurrency: int, max_tokens: int,
                    seed: int) -> dict[str, Any]:  # fmt: skip
    """Closed loop: `concurrency` clients take the next request; streamed, so the first token is seen."""
    queue = list(reversed(list(enumerate(picks))))
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while queue:
            index, pick = queue.pop()
            body = {"model": MODEL if pick is None else f"{mode}-a{pick}", "prompt": prompt(seed * 1000 + index),
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            started = time.perf_counter()
            first = None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    failures += 1
                    console.print(f"{mode}: {response.status_code} {(await response.aread())[:300]!r}")
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if first is None and event.get("choices") and event["choices"][0].get("text"):
                        first = time.perf_counter() - started
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - started)
            if first is not None:
                ttfts.append(first)

    begun = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {"latencies": latencies, "ttfts": ttfts, "tokens": tokens, "wall": time.perf_counter() - begun,
            "failures": failures}  # fmt: skip


def gateway_counts(gateway: str) -> tuple[float, dict[str, float]]:
    """The gateway's adapter loads so far (every outcome) and its routing decisions by reason, from its
    /metrics (the operator's, since admin keys are set)."""
    text = httpx.get(f"{gateway}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
    loads, reasons = 0.0, dict[str, float]()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_adapter_loads_total":
                loads += sample.value
            elif sample.name == "gateway_routing_decisions_total":
                reasons[sample.labels["reason"]] = reasons.get(sample.labels["reason"], 0) + sample.value
    return loads, reasons


def engine_swaps(logs: list[Path]) -> tuple[int, int]:
    """(adapters read from disk into a CPU cache, adapters put into a batch slot) so far, both workers."""
    text = "".join(log.read_text(errors="replace") for log in logs)
    return text.count("Adding lora."), text.count("Activating LoRA.")


def measured_round(
    url: str, mode: str, logs: list[Path], args: argparse.Namespace, index: int
) -> dict[str, Any]:
    """One round of one mode, with what the gateway and the engines did meanwhile."""
    picks = workload(args.requests, args.adapters, args.base_share, args.zipf, seed=index)
    before = (*gateway_counts(url), engine_swaps(logs))
    run = asyncio.run(run_round(url, mode, picks, args.concurrency, args.max_tokens, index))
    after = (*gateway_counts(url), engine_swaps(logs))
    run["gateway_loads"] = after[0] - before[0]
    run["disk_loads"], run["slot_loads"] = (a - b for a, b in zip(after[2], before[2], strict=True))
    run["reasons"] = {k: v - before[1].get(k, 0) for k, v in after[1].items() if v > before[1].get(k, 0)}
    console.print(f"round {index} {mode}: p50 {percentile(run['latencies'], 50):.2f} s, "
                  f"{len(run['latencies']) / run['wall']:.2f} req/s, gateway loads {run['gateway_loads']:g}, "
                  f"vLLM disk loads {run['disk_loads']}, slot loads {run['slot_loads']}, "
                  f"failures {run['failures']}")  # fmt: skip
    return run


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Workers once, one gateway per mode, alternating rounds (see the module's doc); the summaries and
    whether every round ran (interrupted: the rounds both modes finished are kept)."""
    adapters = make_adapters(args.adapters, Settings().model_dir(MODEL))
    folder = Path(tempfile.mkdtemp(prefix="bench-adapter-routing-"))
    workers, logs, worker_urls = start_workers(args.max_loras, args.max_cpu_loras, folder)
    gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    complete = False
    try:
        for mode in MODES:
            gateways[mode] = start_gateway(mode, worker_urls, adapters)
        for index in range(args.rounds):
            for mode in MODES if index % 2 == 0 else tuple(reversed(MODES)):
                runs[mode].append(measured_round(gateways[mode][1], mode, logs, args, index))
        complete = True
    except KeyboardInterrupt:
        console.print("interrupted: the rounds both modes finished are reported")
    finally:
        stop_all([process for process, _ in gateways.values()], workers)
    done = min(len(mode_runs) for mode_runs in runs.values())
    return {mode: summarize(runs[mode][:done]) for mode in MODES}, complete


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a `timeout`) stops the run as Ctrl-C does: workers stopped, measured rounds kept."""
    raise KeyboardInterrupt


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds together."""
    latencies = [x for run in runs for x in run["latencies"]]
    ttfts = [x for run in runs for x in run["ttfts"]]
    wall = sum(run["wall"] for run in runs) or float("nan")  # no round finished: NaN, not a crash
    total = {key: sum(run[key] for run in runs) for key in ("gateway_loads", "disk_loads", "slot_loads")}
    return {
        "latency_p50_s": percentile(latencies, 50),
        "latency_p90_s": percentile(latencies, 90),
        "ttft_p50_s": percentile(ttfts, 50),
        "requests_per_s": len(latencies) / wall,
        "output_tokens_per_s": sum(run["tokens"] for run in runs) / wall,
        "requests": len(latencies),
        "failures": sum(run["failures"] for run in runs),
        **total,
        "reasons": {
            k: sum(r["reasons"].get(k, 0) for r in runs) for k in {k for r in runs for k in r["reasons"]}
        },
        "per_round": [{k: v for k, v in run.items() if k not in ("latencies", "ttfts")} for run in runs],
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the table."""
    rows = [[mode if mode == "affinity" else "least_outstanding, no affinity", r["latency_p50_s"], r["latency_p90_s"],
             r["ttft_p50_s"], r["requests_per_s"], r["output_tokens_per_s"], f"{r['gateway_loads']:g}",
             r["disk_loads"], r["slot_loads"], r["requests"], r["failures"],
             ", ".join(f"{k} {v:g}" for k, v in sorted(r["reasons"].items()))]
            for mode, r in results.items()]  # fmt: skip
    table(f"Adapter routing, two Gemma replicas, {args.adapters} adapters, max_loras {args.max_loras}, "
          f"max_cpu_loras {args.max_cpu_loras} (seconds)",
          ["mode", "latency p50", "latency p90", "TTFT p50", "req/s", "output tok/s", "gateway loads",
           "vLLM disk loads", "vLLM slot loads", "requests", "failures", "routing reasons"], rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (the modes alternate)")
    parser.add_argument("--requests", type=int, default=16, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--max-loras", type=int, default=2, help="adapters in one batch per worker")
    parser.add_argument("--max-cpu-loras", type=int, default=3, help="adapters in memory per worker")
    parser.add_argument("--base-share", type=float, default=0.2, help="share of base-model requests")
    parser.add_argument("--zipf", type=float, default=1.0, help="skew of the adapter mix (rank^-s)")
    parser.add_argument("--save-as", default="adapter-routing", help="results file name (in bench/results/)")
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests = 1, 8
    signal.signal(signal.SIGTERM, interrupt)
    results, complete = measure(args)
    path = save(args.save_as if not args.quick else f"{args.save_as}-quick",
                {"args": vars(args), "complete": complete, "results": results})  # fmt: skip
    report(results, args)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
