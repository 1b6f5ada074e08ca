"""API keys: with keys configured, every route but the open ones needs `Authorization: Bearer <key>`
(compared in constant time), and each key may be rate limited. A refusal is a typed error answered
through `errors.reject`."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

from limits import RateLimitItem, parse, storage, strategies
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import reject
from service.errors import RateLimited, Unauthorized

OPEN_PREFIXES = ("/static/",)  # the playground's files: no secret in them (the page asks for the key)


class ApiKeyMiddleware:
    """With keys configured, every route but the open ones needs `Authorization: Bearer <key>`;
    each key may also be rate limited."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        open_paths: frozenset[str] = frozenset(),
        rate_limit: str | None = None,
    ) -> None:
        self.app = app
        # Compare digests so the comparison time says nothing about a key's length or prefix.
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.open_paths = open_paths
        self.limit: RateLimitItem | None = parse(rate_limit) if rate_limit else None
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    def _key_index(self, scope: Scope) -> int | None:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        digest = hashlib.sha256(token.strip()).digest()
        found = None
        for index, known in enumerate(self.digests):
            if hmac.compare_digest(digest, known):  # no early exit: every key is compared
                found = index
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        index = self._key_index(scope)
        if index is None:
            await reject(scope, receive, send, Unauthorized())
            return
        if self.limit is not None and not self.limiter.hit(self.limit, str(index)):
            reset, _ = self.limiter.get_window_stats(self.limit, str(index))
            retry_after = max(1, int(reset - time.time()) + 1)
            await reject(scope, receive, send, RateLimited(str(self.limit), retry_after))
            return
        scope.setdefault("state", {})["api_key_id"] = self.digests[index][:16].hex()
        await self.app(scope, receive, send)
