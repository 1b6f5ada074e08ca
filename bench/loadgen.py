"""Closed-loop load generator (its own process): `concurrency` clients send `requests` requests in
all and time them. Writes one JSON object (latencies, inter-event gaps, events, wall time) to the
file named by --output, or prints it. A file, because a report of a few hundred KiB read back through a
pipe once came back with a chunk missing in CI."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp


async def run(
    url: str, body: dict[str, Any], concurrency: int, requests: int, bearer: str | None = None
) -> dict[str, Any]:
    latencies: list[float] = []
    first_events: list[float] = []
    gaps: list[float] = []
    events = 0
    failures = 0
    statuses: dict[int, int] = {}  # the status of each failure
    first_errors: dict[int, str] = {}  # the first answer of each failing status (what went wrong)
    remaining = requests
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal remaining, events, failures
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as response:
                    if response.status != 200:
                        failures += 1
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                        answer = await response.read()
                        first_errors.setdefault(response.status, answer[:500].decode(errors="replace"))
                        continue
                    if body.get("stream"):
                        last = None
                        async for line in response.content:
                            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                                continue
                            now = time.perf_counter()
                            if last is None:
                                first_events.append(now - started)
                            else:
                                gaps.append(now - last)
                            last = now
                            events += 1
                    else:
                        await response.read()
                latencies.append(time.perf_counter() - started)

        begun = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - begun
    return {
        "latencies": latencies,
        "first_events": first_events,
        "gaps": gaps,
        "events": events,
        "failures": failures,
        "failure_statuses": statuses,
        "first_errors": first_errors,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON request body")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--output", type=Path, help="write the JSON report here instead of stdout")
    parser.add_argument("--bearer", help="an API key to send (Authorization: Bearer)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.url, json.loads(args.body), args.concurrency, args.requests, args.bearer))
    report = json.dumps(result)
    if args.output is None:
        print(report)
    else:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
