"""Chat rendering cost, this checkout against another (`--before`, e.g. the main checkout), alternating
rounds in one run: the control-token check on the result sits on every chat request's hot path.

    .venv/bin/python -m bench.render --before /work/main            # both parts, writes bench/results/render.json
    .venv/bin/python -m bench.render --before /work/main --quick    # a few seconds

Two parts, each run against both checkouts:
- `render_chat` alone (in a process per checkout, each importing its own `service`): CPU µs per render
  of a short chat, a 40-turn chat and a chat with tools and a tool call;
- the gateway: each checkout's gateway (an instruct model on SmolLM2's tokenizer) in front of the same
  fast stand-in upstream (`bench/fast_upstream.py`), `POST /chat` and `/v1/chat/completions` at
  concurrency 8; the gateway process's CPU per request (as `bench.overhead` counts it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, gateway_env, loadgen, save, table, wait_http
from bench.overhead import cpu_seconds
from service.ops.settings import Settings
from service.workers.supervisor import free_port

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
SHORT = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
LONG = [SYSTEM] + [
    {"role": ("user", "assistant")[i % 2], "content": f"Turn {i}: a sentence or two of ordinary text. " * 4}
    for i in range(40)
]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOLS = [*SHORT, {"role": "assistant", "content": "", "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]  # fmt: skip
CASES = {"short": (SHORT, None), "40 turns": (LONG, None), "tools": (TOOLS, [TOOL])}

# Run in a process per checkout: prints {case: µs per render}.
MICRO = """
import json, sys, time
from service.core.templates import ChatOptions, load_tokenizer
from service.ops.settings import ModelKind, ModelSpec, Settings
spec = ModelSpec(name="m", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct")
tokenizer = load_tokenizer(spec, Settings())
cases, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
result = {}
for name, (messages, tools) in cases.items():
    options = ChatOptions(tools=tools)
    for _ in range(repeat // 10):
        tokenizer.render_chat(messages, options)
    started = time.process_time()
    for _ in range(repeat):
        tokenizer.render_chat(messages, options)
    result[name] = (time.process_time() - started) / repeat * 1e6
print(json.dumps(result))
"""


def micro(checkout: Path, repeat: int) -> dict[str, float]:
    """µs of CPU per `render_chat` call of each case, with `checkout`'s code."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    run = subprocess.run(
        [sys.executable, "-c", MICRO, json.dumps(CASES), str(repeat)],
        cwd=checkout, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(run.stdout)
    return result


def start_gateway(checkout: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    """`checkout`'s gateway with one instruct model in front of `upstream`."""
    port = free_port("127.0.0.1")
    tokenizer = Settings().resolve_source("builtin:smollm2-135m-instruct")
    models = [{"name": "m", "kind": "instruct", "tokenizer": tokenizer, "urls": [upstream]}]
    env = gateway_env()
    env.update(
        PYTHONPATH=str(checkout), GATEWAY_PORT=str(port), GATEWAY_MODELS=json.dumps(models),
        GATEWAY_MAX_IN_FLIGHT_PER_WORKER="4096", GATEWAY_MAX_QUEUE_PER_MODEL="4096", GATEWAY_PROCESSES="1",
    )  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], cwd=checkout, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", 120, process)
    return process, url


def through_gateways(before: Path, rounds: int, requests: int) -> dict[str, dict[str, float]]:
    """CPU ms per request of each checkout's gateway, per path, over alternating rounds."""
    upstream_port = free_port("127.0.0.1")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.fast_upstream", "--port", str(upstream_port)], cwd=ROOT
    )
    direct = f"http://127.0.0.1:{upstream_port}"
    processes = [upstream]
    try:
        wait_http(f"{direct}/health", 60, upstream)
        gateways = {}
        for name, checkout in (("before", before), ("after", ROOT)):
            process, url = start_gateway(checkout, direct)
            processes.append(process)
            gateways[name] = (process.pid, url)
        bodies = {
            "/chat": {"messages": SHORT, "max_tokens": 1},
            "/v1/chat/completions": {"model": "m", "messages": SHORT, "max_tokens": 1},
        }
        totals = {(p, n): [0.0, 0] for p in bodies for n in gateways}
        for path, body in bodies.items():
            for pid_url in gateways.values():  # warm up
                loadgen(f"{pid_url[1]}{path}", body, 8, max(8, requests // 10))
            for _ in range(rounds):
                for name, (pid, url) in gateways.items():
                    cpu = cpu_seconds(pid)
                    result = loadgen(f"{url}{path}", body, 8, requests)
                    assert result["failures"] == 0, (name, path, result["failures"])
                    totals[(path, name)][0] += cpu_seconds(pid) - cpu
                    totals[(path, name)][1] += requests
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return {
        path: {name: totals[(path, name)][0] / totals[(path, name)][1] * 1e3 for name in gateways}
        for path in bodies
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    rounds, repeat, requests = (1, 200, 200) if args.quick else (args.rounds, 3000, 3000)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(rounds):
        runs["before"].append(micro(args.before, repeat))
        runs["after"].append(micro(ROOT, repeat))
    renders = {
        case: {name: min(run[case] for run in measured) for name, measured in runs.items()} for case in CASES
    }
    rows = [[case, r["before"], r["after"], r["after"] / r["before"]] for case, r in renders.items()]
    table("render_chat, CPU µs per call (best round)", ["case", "before", "after", "ratio"], rows)
    gateway = through_gateways(args.before, rounds, requests)
    rows = [[path, r["before"], r["after"], r["after"] / r["before"]] for path, r in gateway.items()]
    table("Gateway CPU ms per chat request (c=8, all rounds)", ["path", "before", "after", "ratio"], rows)
    name = "render-quick" if args.quick else "render"
    save(
        name, {"before": str(args.before), "rounds": rounds, "render_us": renders, "gateway_cpu_ms": gateway}
    )


if __name__ == "__main__":
    main()
