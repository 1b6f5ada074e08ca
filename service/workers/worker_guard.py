"""The workers' own door: a pure-ASGI guard a vLLM server loads with `--middleware`, so that only
the gateway can use a worker.

vLLM's `--api-key` checks only paths under /v1, /v2, /inference and /cohere: `POST /invocations`
(generation, chat included), `/tokenize`, `/detokenize`, `/metrics`, `/version`, `/load`,
`/scale_elastic_ep`, `/openapi.json` and others stay open to anyone who reaches the port. This guard
does not depend on that list: every request, whatever its path or method (WebSockets included),
needs `Authorization: Bearer <key>`, except `/health` (the kubelet's and compose's probes carry no
key). The key is the worker's `VLLM_API_KEY`, compared in constant time. Without a key the guard
lets everything through and says so once in the worker's log.

The worker imports this file, so it imports only the standard library: it loads in any Python that
runs vLLM, also copied on its own as `llm_gateway_worker_guard.py` (what the gateway does for the
workers it launches, and what the deployment files mount into vLLM's own image):

    python -m vllm.entrypoints.openai.api_server ... --middleware llm_gateway_worker_guard.WorkerGuard
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

KEY_VARIABLE = "VLLM_API_KEY"
OPEN_PATHS = frozenset({"/health"})
MODULE_NAME = "llm_gateway_worker_guard"  # the name the worker imports this file under
MIDDLEWARE = f"{MODULE_NAME}.WorkerGuard"
POLICY_VIOLATION = 1008  # WebSocket close code: refused before the handshake completes (HTTP 403)
REFUSAL = json.dumps(
    {
        "error": {
            "message": "This worker serves its gateway only: send `Authorization: Bearer <workers' key>`.",
            "type": "authentication_error",
            "param": None,
            "code": "worker_key_required",
        }
    }
).encode()
REFUSAL_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(REFUSAL)).encode()),
    (b"www-authenticate", b"Bearer"),
]

log = logging.getLogger("llm_gateway.worker_guard")

Scope = dict[str, Any]


class WorkerGuard:
    """Refuses (401) every request without the workers' key, on every path but `/health`."""

    def __init__(self, app: Any, key: str | None = None) -> None:
        self.app = app
        key = os.environ.get(KEY_VARIABLE, "") if key is None else key
        # Digests, so the comparison time says nothing about the key's length or prefix.
        self.digest = hashlib.sha256(key.encode()).digest() if key else None
        if self.digest is None:
            log.warning("worker guard: no %s: every route is open to whoever reaches it", KEY_VARIABLE)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if self.digest is None or kind not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
        else:
            await send({"type": "http.response.start", "status": 401, "headers": REFUSAL_HEADERS})
            await send({"type": "http.response.body", "body": REFUSAL})

    def allows(self, scope: Scope) -> bool:
        """Whether the request may pass: an open path, or the key."""
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path in OPEN_PATHS or self.carries_key(scope)

    def carries_key(self, scope: Scope) -> bool:
        """Whether the first `Authorization` header is `Bearer <the key>`."""
        assert self.digest is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() != b"bearer" or not token:
                    return False
                return hmac.compare_digest(hashlib.sha256(token).digest(), self.digest)
        return False


def install(folder: Path) -> Path:
    """This file, copied as `llm_gateway_worker_guard.py` into `folder` (private to this user) for a
    worker to import; replaced only when it differs, atomically. Returns the folder."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # whoever could write here could replace the guard
    source = Path(__file__).read_bytes()
    target = folder / f"{MODULE_NAME}.py"
    if not target.exists() or target.read_bytes() != source:
        partial = folder / f".{MODULE_NAME}.{os.getpid()}.tmp"
        partial.write_bytes(source)
        os.replace(partial, target)
    return folder


def guard_launch(argv: list[str], env: dict[str, str], folder: Path) -> None:
    """Make a worker's command line and environment load the guard (installed into `folder`)."""
    install(folder)
    argv += ["--middleware", MIDDLEWARE]
    # Only this folder is added to the worker's import path: it holds the guard alone.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
