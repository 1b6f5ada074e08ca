"""Reading server-sent events in tests."""

from __future__ import annotations

import json
from typing import Any

import httpx


def read_events(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """JSON events of an SSE response, and whether it ended with `data: [DONE]`."""
    events: list[dict[str, Any]] = []
    done = False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        assert not done, "event after [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def stream_post(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """POST a streaming request and collect its events."""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response)
