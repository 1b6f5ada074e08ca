"""A worker's non-streamed answer, kept as the bytes it came as.

`/v1` answers go back to the client as those bytes: the gateway never parses a whole one. What it
needs of them is found cheaply: the usage object (searched from the end, where vLLM writes it) and,
for traced requests, the id, model and finish reasons. Native answers are parsed: on the event loop
when small, in a thread above `INLINE_PARSE_BYTES` with a decoder that lets go of the GIL (the C
`json.loads` holds it for its whole run, so a thread alone would stall the loop just the same).
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import re
from dataclasses import dataclass, field
from typing import Any

from service.errors import UpstreamUnavailable

# Answers up to this size are parsed on the loop (about 15 ms of json.loads at most).
INLINE_PARSE_BYTES = 1 << 20
USAGE_KEY = b'"usage"'
# A string value can hold `"usage"` only as `\"usage\"`, so an unescaped `"usage"` followed by a
# colon and an object is a key. The last one is the top-level object's (vLLM writes usage after
# the choices); `raw_decode` then reads just that object.
AFTER_KEY = re.compile(rb"\s*:\s*\{")
ANSWER_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{0,200})"')
ANSWER_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{0,200})"')
FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z_]+)"')
HEAD_BYTES = 1024  # id and model come first in every OpenAI answer
USAGE_WINDOW = 4096


@dataclass(frozen=True)
class Answer:
    """A worker's whole answer: its bytes, and its usage (found without parsing the rest)."""

    raw: bytes | bytearray  # bytearray: read into one buffer sized up front, never copied
    usage: dict[str, Any] | None = field(default=None)

    @classmethod
    def of(cls, raw: bytes | bytearray) -> Answer:
        """An answer from its bytes (usage found by `find_usage`)."""
        return cls(raw, find_usage(raw))

    @property
    def data(self) -> dict[str, Any]:
        """The whole answer parsed, on the loop (tests and small answers; see `parse_answer`)."""
        return _as_object(json.loads(self.raw))

    def summary(self) -> tuple[str | None, str | None, list[str]]:
        """Its id, model and finish reasons (for a trace), read from the bytes."""
        head = self.raw[:HEAD_BYTES]
        found_id, found_model = ANSWER_ID.search(head), ANSWER_MODEL.search(head)
        reasons = FINISH_REASON.findall(self.raw) if len(self.raw) <= INLINE_PARSE_BYTES else []
        return (
            found_id.group(1).decode(errors="replace") if found_id else None,
            found_model.group(1).decode(errors="replace") if found_model else None,
            [reason.decode() for reason in reasons],  # ASCII letters only
        )


def find_usage(raw: bytes | bytearray) -> dict[str, Any] | None:
    """The answer's top-level usage object, or None: the last `"usage"` key followed by an object."""
    end = len(raw)
    decoder = json.JSONDecoder()
    while (start := raw.rfind(USAGE_KEY, 0, end)) >= 0:
        end = start
        after = AFTER_KEY.match(raw, start + len(USAGE_KEY))
        if after is None or raw[start - 1 : start] == b"\\":
            continue
        opening = after.end() - 1
        try:  # a usage object is a few counts: a window of the bytes holds it whole
            usage, _ = decoder.raw_decode(raw[opening : opening + USAGE_WINDOW].decode(errors="replace"))
        except ValueError:
            continue
        return usage if isinstance(usage, dict) else None
    return None


def looks_like_object(raw: bytes | bytearray) -> bool:
    """Whether the bytes are framed as one JSON object (the check a passed-through answer gets)."""
    return raw[:64].lstrip().startswith(b"{") and raw[-64:].rstrip().endswith(b"}")  # no copy of the body


async def parse_answer(raw: bytes | bytearray, model: str) -> dict[str, Any]:
    """The answer parsed: small ones on the loop, large ones in a thread that lets the loop run.
    Malformed JSON is the worker failing (502)."""
    try:
        if len(raw) <= INLINE_PARSE_BYTES:
            return _as_object(json.loads(raw))
        return _as_object(await asyncio.to_thread(yielding_loads, raw))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise UpstreamUnavailable(f"The worker for model '{model}' sent malformed JSON.") from exc


def yielding_loads(raw: bytes | bytearray) -> Any:
    """`json.loads` with the object and array scanning in Python (strings still in C): about ten
    times slower, but it runs bytecode, so a thread running it gives the GIL up every few ms."""
    decoder = json.JSONDecoder()
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder.decode(raw.decode())


def _as_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("the answer is not a JSON object")
    return value
