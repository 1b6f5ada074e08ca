"""The operator's routes (adapters, keys, usage) need one of `GATEWAY_ADMIN_KEYS`: keys of their own,
never a client's. Without admin keys the operator API is off. Refusals are typed errors answered
through `errors.reject`; wrong keys count against the client address as client keys do."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import ClientAddress, FailedKeyLimit
from service.api.endpoint import PathSet
from service.api.errors import reject
from service.errors import Forbidden, TooManyFailedKeys, Unauthorized
from service.ops.counters import Window, Windows
from service.ops.host_counters import HostCounters

ADMIN_OFF = "The operator API is off: set GATEWAY_ADMIN_KEYS to use it."
NOT_ADMIN = (
    "Missing or invalid admin key: operator routes need `Authorization: Bearer <admin key>` with one of "
    "GATEWAY_ADMIN_KEYS (client API keys are not admin keys)."
)


class AdminGuard:
    """Lets a request to an operator route through only with an admin key."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        paths: PathSet,
        failed_keys: FailedKeyLimit | None = None,
        counters: HostCounters | None = None,
    ) -> None:
        self.app = app
        self.paths = paths
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.failures: Windows | None = None
        failed_keys = failed_keys or FailedKeyLimit()
        if failed_keys.attempts:
            counters = counters or HostCounters.in_memory()
            self.failures = counters.windows("addresses", Window(failed_keys.attempts, failed_keys.seconds))
        self.client_address = ClientAddress(failed_keys.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if not self.digests:
            await reject(scope, receive, send, Forbidden(ADMIN_OFF, code="admin_api_off"))
            return
        address = f"address/{self.client_address.of(scope)}"
        if self.failures is not None:
            throttled = self.failures.check(address)
            if not throttled.allowed:
                await reject(scope, receive, send, TooManyFailedKeys(throttled.retry_after_header))
                return
        if not self._is_admin(scope):
            if self.failures is not None:
                self.failures.hit(address)
            await reject(scope, receive, send, Unauthorized(NOT_ADMIN))
            return
        await self.app(scope, receive, send)

    def _is_admin(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip()).digest()
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(digest, known)  # no early exit: every key is compared
        return found
