"""Where a key's CPU goes: three gateway apps of this tree in one process (no keys, a static key, a runtime
key with every limit), the same unstreamed requests through httpx.ASGITransport to a fast stand-in,
alternating small batches so the machine's drifting load hits all three alike; CPU per request of each
(process time, the in-process client's included) and, with --profile, a cProfile of each app's batches.

    .venv/bin/python -m bench.tenants_overhead_profile --batches 20
    .venv/bin/python -m bench.tenants_overhead_profile --profile /tmp/keys-profile   # then pstats
    .venv/bin/python -m bench.tenants_overhead_profile --concurrency 32   # as bench.tenants_overhead's c=32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, table, wait_http
from bench.overhead import PROMPT
from bench.tenants_overhead import POLICY
from service.api.app import create_app
from service.ops.settings import Settings
from service.workers.supervisor import free_port

MODES = {
    "no keys": {},
    "static key": {"api_keys": ["bench-static-key"]},
    "runtime key": {"admin_keys": ["admin"]},
}
Client = tuple[httpx.AsyncClient, dict[str, str]]


async def open_client(stack: contextlib.AsyncExitStack, mode: str, direct: str) -> Client:
    """One app of `mode`, lifespan on, and a client with its key."""
    tokenizer = Settings().resolve_source("builtin:smollm2-135m-instruct")
    store = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "gateway.db"
    settings = Settings.model_validate(
        {"models": [{"name": "m", "kind": "base", "tokenizer": tokenizer, "urls": [direct]}],
         "max_in_flight_per_worker": 4096, "max_queue_per_model": 4096, "database_url": f"sqlite:///{store}",
         **MODES[mode]}
    )  # fmt: skip
    app = create_app(settings)
    await stack.enter_async_context(app.router.lifespan_context(app))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
    client = await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://gw"))
    for _ in range(600):  # a minute at most
        if (await client.get("/ready")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    key = "bench-static-key" if mode == "static key" else None
    if mode == "runtime key":
        created = await client.post("/keys", json=POLICY, headers={"Authorization": "Bearer admin"})
        key = str(created.json()["key"])
    return client, {"Authorization": f"Bearer {key}"} if key else {}


async def send(client: Client, requests: int, concurrency: int = 1) -> None:
    """`requests` unstreamed completions, `concurrency` at a time (each sender one after another)."""
    http, headers = client
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 1, "stream": False}

    async def sender(count: int) -> None:
        for _ in range(count):
            answer = await http.post("/v1/completions", json=body, headers=headers)
            answer.raise_for_status()

    await asyncio.gather(*(sender(requests // concurrency) for _ in range(concurrency)))


async def measure(
    direct: str, batches: int, batch: int, profile: bool, concurrency: int = 1
) -> tuple[dict[str, list[float]], dict[str, cProfile.Profile]]:
    """Each mode's CPU microseconds per request, one value per batch; its profile (empty unless asked)."""
    for name in [name for name in os.environ if name.startswith("GATEWAY_")]:
        del os.environ[name]  # the settings are the ones given here
    async with contextlib.AsyncExitStack() as stack:
        clients = {mode: await open_client(stack, mode, direct) for mode in MODES}
        profiles = {mode: cProfile.Profile() for mode in MODES}
        for client in clients.values():
            await send(client, 100)  # warm up
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        order = list(MODES)
        for index in range(batches):
            for mode in order[index % 3 :] + order[: index % 3]:
                started = time.process_time()
                with profiles[mode] if profile else contextlib.nullcontext():
                    await send(clients[mode], batch, concurrency)
                sent = batch // concurrency * concurrency
                cpu[mode].append((time.process_time() - started) / sent * 1e6)
    return cpu, profiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=200, help="requests per batch")
    parser.add_argument("--profile", type=Path, help="write each app's cProfile stats in this folder")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    args = parser.parse_args()
    port = free_port("127.0.0.1")
    upstream = subprocess.Popen([sys.executable, "-m", "bench.fast_upstream", "--port", str(port)], cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, upstream)
        direct = f"http://127.0.0.1:{port}"
        profile = args.profile is not None
        cpu, profiles = asyncio.run(
            measure(direct, args.batches, args.batch, profile, max(1, min(args.concurrency, args.batch)))
        )
    finally:
        upstream.terminate()
        upstream.wait()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        for mode, stats in profiles.items():
            stats.dump_stats(args.profile / f"{mode.replace(' ', '-')}.prof")
    medians: dict[str, Any] = {mode: statistics.median(values) for mode, values in cpu.items()}
    none = medians["no keys"]
    rows = [[mode, value, value - none] for mode, value in medians.items()]
    table(
        "CPU µs per request in one process (client included), median of batches", ["app", "µs", "added"], rows
    )


if __name__ == "__main__":
    main()
