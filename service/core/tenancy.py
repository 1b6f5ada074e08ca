"""Who is calling, and what keeps callers apart on the shared workers.

vLLM's prefix cache is shared by every request a worker serves: a prompt that is already cached
answers much faster, so without care one API key can time another's prompts (an exact guess of
someone's prompt is fast, a wrong one slow). vLLM's `cache_salt` enters the hash of a prompt's first
KV block, and every later block hash chains on it: requests with different salts share no block.
So, when API keys are configured, every request a worker receives carries a salt derived from its
caller, and the gateway's prefix routing hashes with the same salt:

- A key's salt is HMAC-SHA256(group key, client salt or nothing), where the group key is
  HMAC-SHA256(secret, the key's cache group). Without keys there is no salt at all (the body sent is
  exactly what it was).
- The secret is `GATEWAY_CACHE_SALT_SECRET` when set. Unset, it is taken from the API keys themselves:
  a key alone in its group is its own secret; a group's secret is a hash of its members' keys. Every
  gateway process and pod configured with the same keys derives the same salts with no more
  configuration, and nobody who lacks a key can derive its salt (not even the holder of another key).
- A key's cache group is its own (`key:<key id>`) unless the operator puts it in a group of
  `GATEWAY_CACHE_GROUPS` (`group:<name>`): keys of one group share one cache on purpose.
- A client's own `cache_salt` still partitions its own cache (it is hashed into the salt) but can
  never name another group's: the worker only ever sees a salt the gateway derived.

Keys managed at runtime (issue 22, `service.core.keys`) are callers too: each alone in its cache group,
its salt derived as a GATEWAY_API_KEYS key's would be (from the secret, else from the key's SHA-256, which
only its holder and the store know), with its policy (`service.core.key_policy`) on the caller.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.core.key_policy import KeyPolicy
from service.errors import InvalidRequest
from service.ops.settings import Settings
from service.workers.pool import ModelPool

log = logging.getLogger(__name__)

SALT_FIELD = "cache_salt"
SALT_LABEL = b"llm-gateway cache salt v1\x00"
# vLLM's own rule for a client's cache_salt (vllm/entrypoints/generate/base/protocol.py), checked here
# too so a client gets vLLM's answer although the worker only sees the derived salt.
MAX_CLIENT_SALT_CHARS = 128
FORBIDDEN_SALT_CHARS = frozenset("@/\\\x00")
EMPTY_SALT = "Parameter 'cache_salt' must be a non-empty string if provided."
BAD_SALT = (
    "Parameter 'cache_salt' must be at most 128 characters and must not contain '@', '/', '\\', or NUL."
)
# Which request schema of the worker a path's body is checked against (see workers/contract.py).
SCHEMA_OF_PATH = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/chat/completions/batch": "BatchChatCompletionRequest",
    "/v1/responses": "ResponsesRequest",
}


def key_id(key: str) -> str:
    """A key's short stable id (what the auth middleware puts in the request's state): the first 16
    bytes of its SHA-256, in hex. Safe to show in logs and configuration."""
    return hashlib.sha256(key.encode()).digest()[:16].hex()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its API key's id and the cache group whose prefix cache it may use."""

    key_id: str | None = None
    cache_group: str | None = None  # None: no isolation (no keys configured)
    salt: str | None = None  # the group's salt, for requests that bring no salt of their own
    may_set_priority: bool = False  # a per-key policy could allow it (issue 22); none does today
    group_key: bytes = field(default=b"", repr=False)
    policy: KeyPolicy | None = None  # a key managed at runtime: what it may use and its limits

    def salt_for(self, client_salt: object = None) -> str | None:
        """The salt the gateway gives the worker: the group's own, or one derived from the client's
        salt too; None without isolation (then the body goes as the client sent it)."""
        if self.cache_group is None or client_salt is None:
            return self.salt
        check_client_salt(client_salt)
        assert isinstance(client_salt, str)
        return _derive(self.group_key, b"\x00" + client_salt.encode())


OPEN = Caller()  # no keys configured: nobody is told apart


class StoredKeys(Protocol):
    """The keys managed at runtime (`service.core.keys.KeyDirectory`), by id."""

    def get(self, ident: str) -> Any: ...

    def __len__(self) -> int: ...


class Tenancy:
    """The callers the configured keys stand for, resolved once per request from the key's id."""

    def __init__(
        self,
        callers: Mapping[str, Caller],
        anonymous: Caller = OPEN,
        stored: StoredKeys | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.callers = dict(callers)
        self.anonymous = anonymous
        self.stored = stored
        self.secret = secret
        self._stored_callers: dict[str, Caller] = {}

    @classmethod
    def from_settings(cls, settings: Settings, stored: StoredKeys | None = None) -> Tenancy:
        """Every configured key's caller, its salt computed now (none is computed per request); keys
        managed at runtime are looked up in `stored`."""
        keys = [key.get_secret_value() for key in settings.api_keys]
        configured = settings.cache_salt_secret
        secret = configured.get_secret_value().encode() if configured else None
        if not keys:
            return cls({}, stored=stored, secret=secret)
        group_of = {member: name for name, members in settings.cache_groups.items() for member in members}
        members: dict[str, list[str]] = {}  # each group's keys, or a key alone
        for key in keys:
            name = group_of.get(key_id(key))
            members.setdefault(f"group:{name}" if name is not None else f"key:{key_id(key)}", []).append(key)
        callers = {
            key_id(key): _caller(key_id(key), group, secret, group_keys)
            for group, group_keys in members.items()
            for key in group_keys
        }
        # A request that passed the key check always has a key id; should one ever lack it, it is
        # still kept apart (fail closed), in a group of its own.
        return cls(callers, _caller(None, "anonymous", secret, keys), stored, secret)

    def caller(self, key_id: str | None) -> Caller:
        """The caller behind a key id (the auth middleware's `api_key_id`; None without keys)."""
        if key_id is None:
            return self.anonymous
        return self.callers.get(key_id) or self._stored_caller(key_id) or self.anonymous

    def _stored_caller(self, ident: str) -> Caller | None:
        """A runtime key's caller, made once (its salt computed then)."""
        found = self._stored_callers.get(ident)
        if found is not None or self.stored is None:
            return found
        record = self.stored.get(ident)
        if record is None:
            return None
        if len(self._stored_callers) > 2 * len(self.stored) + 16:
            self._stored_callers.clear()  # revoked keys' callers: keep the memo bounded by the keys
        group = f"key:{ident}"
        # Alone in its group, a key's own secret is its SHA-256 (as for GATEWAY_API_KEYS): the digest.
        group_key = hmac.new(
            self.secret or record.digest, SALT_LABEL + group.encode(), hashlib.sha256
        ).digest()
        caller = Caller(ident, group, _derive(group_key, b""), group_key=group_key, policy=record.policy)
        self._stored_callers[ident] = caller
        return caller


NO_TENANCY = Tenancy({})


def _caller(ident: str | None, group: str, secret: bytes | None, keys: Sequence[str]) -> Caller:
    """A caller of `group`, its group key derived from the secret, else from the group's keys."""
    if secret is None:  # the group's own keys are its secret: only their holders could derive it
        secret = hashlib.sha256("\x00".join(sorted(keys)).encode()).digest()
    group_key = hmac.new(secret, SALT_LABEL + group.encode(), hashlib.sha256).digest()
    return Caller(ident, group, _derive(group_key, b""), group_key=group_key)


def _derive(group_key: bytes, message: bytes) -> str:
    """64 hex characters: within vLLM's 128-character limit, none of its forbidden characters."""
    return hmac.new(group_key, message, hashlib.sha256).hexdigest()


def check_client_salt(value: object) -> None:
    """Refuse (400) a client's cache_salt that vLLM itself would refuse, in vLLM's words."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(EMPTY_SALT, param=SALT_FIELD)
    if len(value) > MAX_CLIENT_SALT_CHARS or not FORBIDDEN_SALT_CHARS.isdisjoint(value):
        raise InvalidRequest(BAD_SALT, param=SALT_FIELD)


# ---------------------------------------------------------------- the salt on the way to a worker

_warned: set[tuple[str, str]] = set()


def worker_salt(caller: Caller, pool: ModelPool, path: str, client_salt: object = None) -> str | None:
    """The cache_salt a request to `path` carries to the worker, or None to add none (no keys, or a
    worker whose schema has no cache_salt: then the gateway says so once in its log)."""
    if caller.cache_group is None:
        return None
    salt = caller.salt_for(client_salt)
    return salt if accepts_salt(pool, SCHEMA_OF_PATH.get(path, "CompletionRequest")) else None


def accepts_salt(pool: ModelPool, schema: str) -> bool:
    """Whether the model's worker takes a cache_salt in `schema` (assumed when it publishes no schema:
    vLLM ignores a field it does not know)."""
    known: dict[str, frozenset[str]] | None = pool.fact("fields")
    accepted = known.get(schema) if known else None
    if accepted is None or SALT_FIELD in accepted:
        return True
    if (pool.name, schema) not in _warned:
        _warned.add((pool.name, schema))
        log.warning(
            "the worker of model %s takes no cache_salt in %s: its prefix cache is shared by every API key "
            "(a key's prompts can be timed by another); upgrade the worker to a vLLM with cache_salt",
            pool.name, schema,
        )  # fmt: skip
    return False


def add_salt(body: dict[str, Any], caller: Caller, pool: ModelPool, path: str = "/v1/completions") -> None:
    """Put the caller's salt, if it gets one, in a body the gateway built."""
    salt = worker_salt(caller, pool, path)
    if salt is not None:
        body[SALT_FIELD] = salt


def with_salt(body: dict[str, Any] | bytes, salt: str | None) -> dict[str, Any] | bytes:
    """A body for the worker with `cache_salt` set to `salt` (nothing changes for None). The client's
    own bytes get the field spliced in as the object's last member, no re-serialisation: vLLM's
    parser (Python's json) and the gateway's (pydantic) both keep the last of duplicate keys, so it
    wins over any cache_salt the client sent, however spelled."""
    if salt is None:
        return body
    if isinstance(body, dict):
        return {**body, SALT_FIELD: salt}
    return splice_member(body, SALT_FIELD, salt)


def splice_member(raw: bytes, name: str, value: str) -> bytes:
    """The JSON object `raw` with `"name": value` appended as its last member (one copy)."""
    end = raw.rfind(b"}")
    if end < 0 or raw[end + 1 :].strip():
        raise ValueError("not a JSON object")
    inner = raw[:end].rstrip()
    separator = b"" if inner.endswith(b"{") else b","
    return b"".join((inner, separator, _member(name, value)))


@functools.lru_cache(maxsize=1024)
def _member(name: str, value: str) -> bytes:
    """`"name":value}` as bytes (made once per salt: a key's requests all carry the same one)."""
    return b"".join((_json_string(name), b":", _json_string(value), b"}"))


def _json_string(text: str) -> bytes:
    """`text` as a JSON string; plain printable ASCII (a salt's hex) without the encoder's cost."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return b'"' + text.encode() + b'"'
    return json.dumps(text).encode()


# ---------------------------------------------------------------- fields that are the operator's


def check_client_fields(caller: Caller, fields: Mapping[str, Any]) -> None:
    """Refuse (400) what this client may not send: a `priority`; with keys, a cache_salt vLLM would
    refuse (the worker never sees the client's own, so the gateway checks it)."""
    check_priority(caller, fields)
    client_salt = fields.get(SALT_FIELD)
    if client_salt is not None and caller.cache_group is not None:
        check_client_salt(client_salt)


def check_priority(caller: Caller, fields: Mapping[str, Any]) -> None:
    """`priority` orders requests in a worker's queue (with `--scheduling-policy priority`): it is the
    operator's to give, not a client's to take. Refused (400) unless it asks for nothing (0) or a
    per-key policy allows it."""
    value = fields.get("priority")
    if value is None or value == 0 or caller.may_set_priority:
        return
    raise InvalidRequest(
        "priority is set by the gateway's operator, not by requests: remove `priority` from the request.",
        param="priority",
    )


def check_stored_responses(fields: Mapping[str, Any]) -> None:
    """`previous_response_id` and `background` need responses stored on the worker, which the gateway
    does not keep per API key: any key could continue (or read) another's conversation. Refused (400)
    until responses are stored per key."""
    if fields.get("previous_response_id") is not None:
        raise InvalidRequest(
            "previous_response_id is not supported: this gateway does not store responses per API key, so "
            "a stored response could be continued by another key. Send the whole conversation in `input`.",
            param="previous_response_id",
        )
    if fields.get("background"):
        raise InvalidRequest(
            "background is not supported: a background response is stored on the worker, and this gateway "
            "does not store responses per API key. Send the request without `background` (or stream it).",
            param="background",
        )
