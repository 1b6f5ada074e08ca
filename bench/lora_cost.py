"""What `--enable-lora` costs a worker: the built-in Gemma launched exactly as the gateway launches it,
once without LoRA and once with the default stack's LoRA flags, both running, then the same base-model
requests sent to each in alternation (the order swapped every request); start-up time, memory, latency,
and whether the base model's answers are the same. Then an adapter is loaded onto the LoRA worker and
the base requests are measured again beside requests on the adapter. Real vLLM workers: run it under
`flock /tmp/e2e.lock`.

    .venv/bin/python -m bench.lora_cost               # writes bench/results/lora_cost.json
    .venv/bin/python -m bench.lora_cost --requests 5 --tokens 16  # quicker
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import console, percentile, save, table, wait_http
from service.ops.settings import Settings, default_models
from service.workers.supervisor import free_port, launch_plan

PROMPT = "The history of the city of Rome"
SHAPES = (16, 128)  # tokens generated (ignore_eos), by default


def start(lora: bool, folder: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """The default stack's Gemma worker, with or without LoRA; its process, URL and seconds to ready."""
    [spec] = [model for model in default_models() if model.name == "gemma-3-270m"]
    spec = spec.model_copy(update={"lora": lora, "max_loras": 2 if lora else None})
    settings = Settings(models=[spec], cache_dir=Path.home() / ".cache" / "llm-gateway")
    port = free_port("127.0.0.1")
    plan = launch_plan(spec, settings, port, None, 0)
    log = open(folder / f"worker-lora-{lora}.log", "wb")  # noqa: SIM115 (kept open while it runs)
    began = time.monotonic()
    process = subprocess.Popen(
        plan.argv, env=plan.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/models", 900, process)
    return process, url, time.monotonic() - began


def memory_mib(process: subprocess.Popen[bytes]) -> dict[str, float]:
    """Resident and unique memory of the worker's processes (MiB)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    infos = [p.memory_full_info() for p in tree]
    return {"rss": sum(i.rss for i in infos) / 2**20, "uss": sum(i.uss for i in infos) / 2**20}


def ask(url: str, model: str, tokens: int) -> tuple[float, list[float]]:
    """Seconds for one greedy completion and its tokens' logprobs."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "logprobs": 0}  # fmt: skip
    began = time.monotonic()
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    elapsed = time.monotonic() - began
    answer.raise_for_status()
    return elapsed, answer.json()["choices"][0]["logprobs"]["token_logprobs"]


def alternate(targets: list[tuple[str, str, str]], tokens: int, n: int) -> dict[str, Any]:
    """n requests to each target (label, url, model), alternating, the order swapped each time."""
    seconds: dict[str, list[float]] = {label: [] for label, *_ in targets}
    logprobs: dict[str, list[float]] = {}
    for label, url, model in targets:  # one warm-up each, not counted
        logprobs[label] = ask(url, model, tokens)[1]
    for i in range(n):
        for label, url, model in targets if i % 2 == 0 else list(reversed(targets)):
            seconds[label].append(ask(url, model, tokens)[0])
    return {
        label: {
            "p50_ms": percentile(values, 50) * 1000,
            "tokens_per_s": tokens / percentile(values, 50),
            "logprobs": logprobs[label],
        }
        for label, values in seconds.items()
    }


def measure(n: int, adapter: Path, shapes: list[int]) -> dict[str, Any]:
    """Both workers started one after the other, then alternating requests; see the module's doc."""
    folder = Path(tempfile.mkdtemp(prefix="lora-cost-"))
    result: dict[str, Any] = {"started_s": {}, "memory_mib": {}, "latency": {}}
    off, off_url, result["started_s"]["off"] = start(False, folder)
    on, on_url, result["started_s"]["on"] = start(True, folder)
    try:
        result["memory_mib"] = {"off": memory_mib(off), "on": memory_mib(on)}
        console.print(
            f"started (s): {result['started_s']}; memory (MiB): {result['memory_mib']}"
        )  # kept if cut short
        base = [("LoRA off", off_url, "gemma-3-270m"), ("LoRA on", on_url, "gemma-3-270m")]
        for tokens in shapes:
            shape = f"{tokens} tokens"
            result["latency"][shape] = alternate(base, tokens, n)
            console.print(
                shape, {label: round(found["p50_ms"]) for label, found in result["latency"][shape].items()}
            )
        load = httpx.post(
            f"{on_url}/v1/load_lora_adapter", json={"lora_name": "geo", "lora_path": str(adapter)}
        )
        load.raise_for_status()
        loaded = [*base, ("LoRA on, adapter request", on_url, "geo")]
        for tokens in shapes:
            result["latency"][f"{tokens} tokens, an adapter loaded"] = alternate(loaded, tokens, n)
        result["memory_mib"]["on, an adapter loaded"] = memory_mib(on)
    finally:
        for process in (off, on):
            os.killpg(process.pid, 15)
            process.wait(60)
    return result


def report(result: dict[str, Any]) -> None:
    """Print the tables."""
    memory = result["memory_mib"]
    rows = [["LoRA off", f"{result['started_s']['off']:.1f}", f"{memory['off']['rss']:.0f}", f"{memory['off']['uss']:.0f}"],
            ["LoRA on", f"{result['started_s']['on']:.1f}", f"{memory['on']['rss']:.0f}", f"{memory['on']['uss']:.0f}"]]  # fmt: skip
    extra = memory["on, an adapter loaded"]
    rows.append(["LoRA on, an adapter loaded", "-", f"{extra['rss']:.0f}", f"{extra['uss']:.0f}"])
    table("Gemma worker: start-up and memory", ["worker", "ready (s)", "RSS (MiB)", "USS (MiB)"], rows)
    lines = []
    for shape, by_label in result["latency"].items():
        same = by_label["LoRA off"]["logprobs"] == by_label["LoRA on"]["logprobs"]
        for label, found in by_label.items():
            lines.append([shape, label, f"{found['p50_ms']:.0f}", f"{found['tokens_per_s']:.1f}",
                          "yes" if same else "NO"])  # fmt: skip
    table("Base requests, alternating (p50)", ["shape", "target", "p50 (ms)", "tokens/s", "base logprobs equal"],
          lines)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10, help="requests per target and shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(SHAPES),
                        help="tokens generated per request, one shape each (a loaded machine: 16 alone)")  # fmt: skip
    parser.add_argument("--adapter", type=Path, default=Path.home() / ".cache/llm-gateway/adapters/gemma-geo",
                        help="a LoRA folder for the Gemma (tests/trained_adapters.py makes gemma-geo)")  # fmt: skip
    args = parser.parse_args()
    result = measure(args.requests, args.adapter.resolve(), args.tokens)
    report(result)
    for by_label in result["latency"].values():
        for found in by_label.values():
            found["logprobs"] = found["logprobs"][:4]  # enough to see them; the comparison is printed
    console.print(f"saved {save('lora_cost', result)}")


if __name__ == "__main__":
    main()
