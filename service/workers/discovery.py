"""Worker discovery for external models: each configured URL's host name is resolved to all its
addresses (a Kubernetes headless Service, or any DNS name with several records) and re-resolved
periodically, so replicas that scale up or away join and leave the pool without a restart."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from service.workers.pool import ModelPool, Worker

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver returns for `host`."""
    infos: list[Any] = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def expand(url: str, resolver: Resolver) -> list[str]:
    """One worker URL per address behind `url` (the URL itself when its host is an address)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _is_address(host):
        return [url.rstrip("/")]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await resolver(host, port)
    path = parts.path.rstrip("/")
    return [f"{parts.scheme}://{f'[{a}]' if ':' in a else a}:{port}{path}" for a in addresses]


def reconcile(pool: ModelPool, wanted: Sequence[str]) -> None:
    """Make the pool's workers exactly `wanted`, keeping the ones it already has (and their state)."""
    current = {worker.url: worker for worker in pool.workers}
    joined = [url for url in wanted if url not in current]
    left = [url for url in current if url not in wanted]
    if joined or left:
        log.info("model %s: workers joined %s, left %s", pool.name, joined, left)
    # In-flight requests keep their Worker object; leaving the list only stops new ones.
    pool.workers = [current.get(url) or Worker(model=pool.name, url=url) for url in wanted]


async def discover(pools: Sequence[ModelPool], resolver: Resolver = system_resolver) -> None:
    """Resolve every external model's URLs once; a name that fails to resolve keeps its workers."""
    for pool in pools:
        if pool.spec.embedded:
            continue
        wanted: list[str] = []
        try:
            for url in pool.spec.urls:
                wanted += await expand(str(url), resolver)
        except OSError as exc:
            log.warning("model %s: cannot resolve its workers (%s); keeping the last known", pool.name, exc)
            continue
        reconcile(pool, list(dict.fromkeys(wanted)))


async def keep_discovering(
    pools: Sequence[ModelPool], interval: float, resolver: Resolver = system_resolver
) -> None:
    """`discover` every `interval` seconds, forever (cancel to stop)."""
    while True:
        await asyncio.sleep(interval)
        await discover(pools, resolver)
