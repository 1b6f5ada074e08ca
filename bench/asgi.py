"""Raw ASGI helpers shared by the benchmark servers (apart from bench.common, so that the servers
import nothing they don't use)."""

from __future__ import annotations

from typing import Any


async def read_body(receive: Any) -> bytes:
    """The whole request body."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body
