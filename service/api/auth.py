"""API keys: with keys configured, every route but the open ones needs `Authorization: Bearer <key>`
(compared in constant time); each key may be rate limited, and a client address that sends too many
wrong keys is refused for a while before any key is compared. Both count in `Windows`
(service.ops.counters) shared by the gateway processes of the host, so the limits are what the
settings say whatever the process count. A refusal is a typed error answered through `errors.reject`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from limits import parse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.endpoint import PathSet
from service.api.errors import reject
from service.errors import RateLimited, TooManyFailedKeys, Unauthorized
from service.ops.counters import Window, Windows
from service.ops.host_counters import HostCounters
from service.ops.metrics import Metrics

OPEN_PREFIXES = ("/static/",)  # the playground's files: no secret in them (the page asks for the key)
IPV6_GROUP = 64  # one client usually holds a whole /64: count its failures together
MAX_ADDRESS_CHARS = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FailedKeyLimit:
    """Failed key attempts one client address may make within `seconds` (0: no limit), and the
    proxies whose `X-Forwarded-For` names the client."""

    attempts: int = 0
    seconds: float = 60.0
    trusted_proxies: Sequence[str] = ()


def key_id(digest: bytes) -> str:
    """A short stable id of an accepted key (hex of its SHA-256, 16 bytes), for logs and per-key state."""
    return digest[:16].hex()


class ClientAddress:
    """Who a request comes from: the peer, or with the peer a trusted proxy, the nearest address in
    `X-Forwarded-For` that is not a trusted proxy (the entries further left are the client's word)."""

    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self.trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in trusted_proxies
        )

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, scope: Scope) -> str:
        """The client's address as a counting key (an IPv6 address stands for its /64)."""
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        if self.trusted and self._is_trusted(address):
            forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for")
            for hop in reversed(forwarded.decode("latin-1").split(",")):
                address = hop.strip()[:MAX_ADDRESS_CHARS] or address
                if not self._is_trusted(address):
                    break
        return group(address)


def group(address: str) -> str:
    """IPv4 as is; IPv6 as its /64 (an IPv4-mapped one as the IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/{IPV6_GROUP}", strict=False))
    return str(ip)


class ApiKeyMiddleware:
    """With keys configured, every route but the open ones needs `Authorization: Bearer <key>`;
    each key may also be rate limited, and addresses that keep failing are refused for a while."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        open_paths: frozenset[str] = frozenset(),
        rate_limit: str | None = None,
        failed_keys: FailedKeyLimit = FailedKeyLimit(),
        counters: HostCounters | None = None,
        metrics: Metrics | None = None,
        operator_paths: PathSet | None = None,
    ) -> None:
        self.app = app
        self.operator_paths = operator_paths or PathSet([])  # the admin guard's, not client keys
        # Compare digests so the comparison time says nothing about a key's length or prefix.
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.open_paths = open_paths
        counters = counters or HostCounters.in_memory(key_rows=2 * len(keys) + 16)
        self.limit = str(parse(rate_limit)) if rate_limit else ""
        self.rates: Windows | None = counters.windows("keys", rate_window(rate_limit)) if rate_limit else None
        self.failures: Windows | None = None
        if failed_keys.attempts:
            window = Window(failed_keys.attempts, failed_keys.seconds)
            self.failures = counters.windows("addresses", window)
        self.client_address = ClientAddress(failed_keys.trusted_proxies)
        self.metrics = metrics

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES) or path in self.operator_paths

    def _accepted(self, scope: Scope) -> str | None:
        """The id of the request's key if it is one of ours, else None."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        digest = hashlib.sha256(token.strip()).digest()
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(digest, known)  # no early exit: every key is compared
        return key_id(digest) if found else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        address = ""
        if self.failures is not None:
            address = f"address/{self.client_address.of(scope)}"
            throttled = self.failures.check(address)
            if not throttled.allowed:
                self._count("auth_throttled")
                await reject(scope, receive, send, TooManyFailedKeys(throttled.retry_after_header))
                return
        accepted = self._accepted(scope)
        if accepted is None:
            if self.failures is not None:
                self.failures.hit(address)
            self._count("auth_failures")
            await reject(scope, receive, send, Unauthorized())
            return
        scope.setdefault("state", {})["api_key_id"] = accepted
        if self.rates is not None:
            rated = self.rates.hit(f"key/{accepted}")
            if not rated.allowed:
                await reject(scope, receive, send, RateLimited(self.limit, int(rated.retry_after_header)))
                return
        await self.app(scope, receive, send)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()


def rate_window(rate_limit: str) -> Window:
    """`600/minute` as a window: 600 requests in any 60 s."""
    item = parse(rate_limit)
    return Window(item.amount, float(item.get_expiry()))
