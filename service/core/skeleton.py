"""The check on the result: after rendering, a prompt's control tokens must be exactly those its
template writes for the same conversation structure with placeholder text.

The skeleton of a render keeps what templates branch on (roles, types, names, keys that are names,
template switches, empty or whitespace-only strings) and replaces every other user string with
`x`s (as many as the string has, up to 16, between its own leading and trailing whitespace: a
template that checks an id's length or trims still takes the same branch). The skeleton's control
tokens are cached by its fingerprint, so the hot path rarely renders twice.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from typing import Any

from service.core.protocol import is_plain_name

PLACEHOLDER = "x"
SHORT = 16  # strings up to this long keep their length in the skeleton (ids, codes)
EDGE = 8  # leading / trailing whitespace kept, at most
# Values of these keys are what templates branch on (`message.role == 'tool'`, a tool's name).
BRANCH_KEYS = frozenset({"role", "type", "name"})
_RUNS = [PLACEHOLDER * n for n in range(SHORT + 1)]
_named = functools.lru_cache(maxsize=4096)(is_plain_name)  # keys repeat (role, content, type...)


def skeleton(value: Any, names: bool = False) -> Any:
    """`value` with its user text replaced by placeholders; with `names`, every plain-name string is
    kept (template switches such as `reasoning_effort: high`)."""
    if isinstance(value, str):
        return value if names and is_plain_name(value) else placeholder(value)
    if isinstance(value, dict):
        shaped: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if not (isinstance(key, str) and _named(key)):
                key = f"key {index}"  # a space: never one of the kept keys
            elif key in BRANCH_KEYS and isinstance(item, str) and is_plain_name(item):
                shaped[key] = item
                continue
            shaped[key] = skeleton(item, names)
        return shaped
    if isinstance(value, list | tuple):
        return [skeleton(item, names) for item in value]
    return value  # numbers, booleans, None


def placeholder(text: str) -> str:
    """A user string's stand-in: same emptiness, edges and (when short) length, none of its text."""
    if not text:
        return text
    if not (text[0].isspace() or text[-1].isspace()):
        return _RUNS[min(len(text), SHORT)]
    if text.isspace():
        return text[: 2 * EDGE]
    lead = text[: len(text) - len(text.lstrip())][:EDGE]
    trail = text[len(text.rstrip()) :][:EDGE]
    return lead + _RUNS[min(len(text.strip()), SHORT)] + trail


def fingerprint(*parts: Any) -> bytes:
    """A short digest of skeleton parts (the cache key of their control tokens). `repr` of these
    JSON values is unambiguous (strings quoted, dict order kept), and faster than JSON."""
    return hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ControlSequences:
    """A bounded, thread-safe LRU cache: skeleton fingerprint -> its render's control-token ids."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[int, ...] | None:
        """The cached sequence, marked as recently used; None when not cached."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: bytes, sequence: tuple[int, ...]) -> None:
        """Remember a sequence, forgetting the least recently used past the bound."""
        with self._lock:
            self._entries[key] = sequence
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
