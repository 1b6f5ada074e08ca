"""API keys: with keys configured (GATEWAY_API_KEYS, or keys managed at runtime in the store), every
route but the open ones needs `Authorization: Bearer <key>` (configured keys compared in constant time,
runtime keys looked up by their SHA-256 in memory); each key may be rate limited, and a client address
that sends too many wrong keys is refused for a while before any key is compared. Both count in `Windows`
(service.ops.counters) shared by the gateway processes of the host, so the limits are what the
settings say whatever the process count. A runtime key's own limits (rate, requests in progress) are
its policy's, held across processes and pods (`service.core.tenants`), and every request of a key
counts in its usage when it ends. A refusal is a typed error answered through `errors.reject`.
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
from service.core.keys import KEY_PREFIX, RUNTIME_KEY_LENGTH, StoredKey
from service.core.tenants import Tenants
from service.errors import (
    GatewayError,
    KeysUnknowable,
    KeyUncheckable,
    RateLimited,
    TooManyFailedKeys,
    Unauthorized,
)
from service.ops.counters import Window, Windows
from service.ops.host_counters import HostCounters
from service.ops.metrics import Metrics

OPEN_PREFIXES = ("/static/",)  # the playground's files: no secret in them (the page asks for the key)
IPV6_GROUP = 64  # one client usually holds a whole /64: count its failures together
MAX_ADDRESS_CHARS = 64
GROUPED_MEMO = 4096  # addresses whose counting key is remembered (parsing one costs more than the rest)
REVOKED = "This API key was revoked; ask the gateway's operator for a new one."
ADMIN_IS_NO_CLIENT_KEY = (
    "This is an admin key: it opens the operator's routes (/adapters, /keys, /usage) only. Client routes "
    "need a client API key."
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
        self._grouped: dict[str, str] = {}  # address -> its counting key (`group` is a pure function)

    def _is_trusted(self, address: str) -> bool:
        ip = parse_address(address)
        return ip is not None and any(ip in net for net in self.trusted)

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
        found = self._grouped.get(address)
        if found is None:
            if len(self._grouped) >= GROUPED_MEMO:
                self._grouped.clear()  # bounded whatever the addresses seen
            found = self._grouped[address] = group(address)
        return found


def parse_address(text: str) -> IPAddress | None:
    """An address as peers and proxies write it: `[v6]:port`, `v4:port`, zero-padded IPv4, and an
    IPv4-mapped IPv6 peer (a dual-stack listener's view of an IPv4 client) as its IPv4 address; None
    when it is no address (a hostname, `unknown`)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # IPv4 with a port (IPv6 has at least two colons)
        text = text.split(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        parts = text.split(".")
        if len(parts) != 4 or not all(part.isdigit() and len(part) <= 4 for part in parts):
            return None
        numbers = [int(part) for part in parts]
        if max(numbers) > 255:
            return None
        ip = ipaddress.IPv4Address(".".join(map(str, numbers)))  # 010.020.030.040: zero-padded
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def group(address: str) -> str:
    """IPv4 as is; IPv6 as its /64 (an IPv4-mapped one as the IPv4 address); other text as it is."""
    ip = parse_address(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
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
        tenants: Tenants | None = None,
        admin_keys: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.tenants = tenants  # keys managed at runtime (none: only the configured ones)
        self.operator_paths = operator_paths or PathSet([])  # the admin guard's, not client keys
        # Compare digests so the comparison time says nothing about a key's length or prefix.
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        # An operator's own key on a client route is no guess: refused, never counted as a failed attempt.
        self.admin_digests = [hashlib.sha256(key.encode()).digest() for key in admin_keys]
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

    def _accepted(self, scope: Scope) -> tuple[str | None, StoredKey | None]:
        """The id of the request's key if it is a configured one, or the runtime key it is."""
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None, None
        digest = hashlib.sha256(token.strip()).digest()
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(digest, known)  # no early exit: every key is compared
        if found:
            return key_id(digest), None
        return None, self.tenants.find(digest) if self.tenants is not None else None

    def _is_admin_key(self, scope: Scope) -> bool:
        """Whether the request's key is one of GATEWAY_ADMIN_KEYS (looked at on a refusal only)."""
        if not self.admin_digests:
            return False
        _, _, token = _header(scope, b"authorization").partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        found = False
        for known in self.admin_digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def _closed(self) -> bool:
        """Whether keys are needed: some are configured, the store has ever held one, or this process
        cannot tell (cut off from the store past its hold: a first key may have been created elsewhere)."""
        if self.digests:
            return True
        return self.tenants is not None and (self.tenants.closed or not self.tenants.holds_keys())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]) or not self._closed():
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
        accepted, stored = self._accepted(scope)
        if stored is not None and not stored.revoked:
            accepted = stored.id
        refusal = self._refusal(accepted, stored, scope)
        if refusal is not None or accepted is None:  # (a key not accepted always has a refusal)
            refusal = refusal or Unauthorized()
            # A failed attempt, unless it is a key this process knows that it cannot check now (its
            # client retrying as Retry-After invites must not lock out its address's good keys). An
            # unknown key still counts while the store is away: else guesses would go unthrottled. A
            # gateway unsure whether it needs keys at all refuses no guess.
            guess = stored is None and not isinstance(refusal, KeysUnknowable)
            if isinstance(refusal, Unauthorized) and stored is None and self._is_admin_key(scope):
                refusal = Unauthorized(ADMIN_IS_NO_CLIENT_KEY)  # the operator's own key: no guess
            elif isinstance(refusal, Unauthorized) or guess:
                if self.failures is not None:
                    self.failures.hit(address)
                self._count("auth_failures")
            await reject(scope, receive, send, refusal)
            return
        state = scope.setdefault("state", {})
        state["api_key_id"] = accepted
        counted = state.get("record") is not None  # a request the table counts (not a GET of /v1/models)
        slot = None
        try:
            try:
                self._rate(accepted, stored)
                if stored is not None and stored.policy.limited and self.tenants is not None:
                    slot = await self.tenants.admit(stored, counted)  # its own rate, its slot
            except GatewayError as refused:
                await reject(scope, receive, send, refused)
                return
            await self.app(scope, receive, send)
        finally:
            if self.tenants is not None:  # the request counts in its key's usage
                self.tenants.finish(accepted, slot, state.get("record"))

    def _refusal(self, accepted: str | None, stored: StoredKey | None, scope: Scope) -> GatewayError | None:
        """Why the request's key is refused, if it is: unknown or revoked (401), or a key this process
        cannot check now (503: the store is away, and for a runtime key, for longer than the process's
        hold, after which what it knows of the keys, a revocation made elsewhere, may be stale)."""
        if accepted is None:
            if stored is None and self.tenants is not None:
                if not self.digests and not self.tenants.closed:
                    return KeysUnknowable()  # open so far, and now unsure: see `_closed`
                if not self.tenants.reachable and _shaped_like_a_runtime_key(scope):
                    return KeyUncheckable()  # it may be a key created since this process last read them
            return Unauthorized(REVOKED if stored is not None else Unauthorized.DEFAULT)
        if stored is not None and self.tenants is not None and not self.tenants.holds_keys():
            return KeyUncheckable(KeyUncheckable.STALE)
        return None

    def _rate(self, accepted: str, stored: StoredKey | None) -> None:
        """GATEWAY_RATE_LIMIT, for a key without a rate of its own (429 past it)."""
        if (stored is None or not stored.policy.rate_limit) and self.rates is not None:
            rated = self.rates.hit(f"key/{accepted}")
            if not rated.allowed:
                raise RateLimited(self.limit, int(rated.retry_after_header))

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()


def _header(scope: Scope, name: bytes) -> bytes:
    """The last value of header `name` (as a dict of the headers would keep), or b"" (no dict built)."""
    value: bytes = b""
    for key, found in scope["headers"]:
        if key == name:
            value = found
    return value


def _shaped_like_a_runtime_key(scope: Scope) -> bool:
    """Whether the request's bearer token could be a key created at runtime (`sk-gw-` and 43 characters):
    any other is surely no key of the store's, checked or not (a mistyped static key gets its 401)."""
    _, _, token = _header(scope, b"authorization").partition(b" ")
    token = token.strip()
    return token.startswith(KEY_PREFIX.encode()) and len(token) == RUNTIME_KEY_LENGTH


def rate_window(rate_limit: str) -> Window:
    """`600/minute` as a window: 600 requests in any 60 s."""
    item = parse(rate_limit)
    return Window(item.amount, float(item.get_expiry()))
