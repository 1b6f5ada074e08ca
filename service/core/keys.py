"""API keys managed at runtime, as every gateway process holds them: in memory, looked up by the SHA-256
of the presented key (no database call on a request's path), replaced whenever the store's `keys`
revision moves (see `service.core.tenants`).

A key is made of 32 random bytes (`sk-gw-` and 43 URL-safe characters); only its SHA-256 is stored. Its
id is the first 16 bytes of that hash in hex, as for GATEWAY_API_KEYS (`service.core.tenancy.key_id`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.core.key_policy import KeyPolicy, Period, TokenBudget
from service.core.tenancy import key_id

KEY_PREFIX = "sk-gw-"
RUNTIME_KEY_LENGTH = len(KEY_PREFIX) + 43  # token_urlsafe(32): 32 bytes in unpadded base64
DISPLAY_CHARS = 12  # `sk-gw-` and six characters: enough to recognise a key, far too few to guess it


def new_secret() -> str:
    """A fresh key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class StoredKey:
    """One key record (never its secret)."""

    id: str
    digest: bytes
    prefix: str
    name: str
    policy: KeyPolicy
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def describe(self) -> dict[str, Any]:
        """The key as the operator API shows it (no secret)."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            **self.policy.model_dump(mode="json"),
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def new_key(name: str, policy: KeyPolicy, now: datetime) -> tuple[str, StoredKey]:
    """A fresh secret and its record."""
    secret = new_secret()
    digest = hashlib.sha256(secret.encode()).digest()
    record = StoredKey(key_id(secret), digest, secret[:DISPLAY_CHARS], name, policy, now)
    return secret, record


def as_row(key: StoredKey) -> dict[str, Any]:
    """A record as its `api_keys` row."""
    policy = key.policy
    budget = policy.token_budget
    return {
        "id": key.id,
        "digest": key.digest.hex(),
        "prefix": key.prefix,
        "name": key.name,
        "models": json.dumps(policy.models) if policy.models is not None else None,
        "kinds": json.dumps([kind.value for kind in policy.kinds]) if policy.kinds is not None else None,
        "rate_limit": policy.rate_limit,
        "max_concurrent": policy.max_concurrent,
        "budget_tokens": budget.tokens if budget else None,
        "budget_period": budget.period.value if budget else None,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


def from_row(row: Mapping[str, Any]) -> StoredKey:
    """An `api_keys` row as a record."""
    budget = None
    if row["budget_tokens"] is not None:
        budget = TokenBudget(tokens=row["budget_tokens"], period=Period(row["budget_period"] or "day"))
    policy = KeyPolicy(
        models=json.loads(row["models"]) if row["models"] else None,
        kinds=json.loads(row["kinds"]) if row["kinds"] else None,
        rate_limit=row["rate_limit"],
        max_concurrent=row["max_concurrent"],
        token_budget=budget,
    )
    return StoredKey(
        id=row["id"],
        digest=bytes.fromhex(row["digest"]),
        prefix=row["prefix"],
        name=row["name"],
        policy=policy,
        created_at=_utc(row["created_at"]),
        revoked_at=_utc(row["revoked_at"]) if row["revoked_at"] is not None else None,
    )


def _utc(moment: datetime) -> datetime:
    """SQLite gives back a time without its zone: the store writes UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class KeyDirectory:
    """Every stored key (revoked ones too: a revoked key gets its own 401), by digest and by id."""

    def __init__(self, keys: Iterable[StoredKey] = ()) -> None:
        self.by_digest: dict[bytes, StoredKey] = {}
        self.by_id: dict[str, StoredKey] = {}
        self.revision = -1  # the store's `keys` revision these keys are from
        self.replace(keys, -1)

    def replace(self, keys: Iterable[StoredKey], revision: int) -> None:
        """The store's keys as of `revision` (one swap: a request sees the old set or the new one)."""
        by_id = {key.id: key for key in keys}
        self.by_digest, self.by_id = {key.digest: key for key in by_id.values()}, by_id
        self.revision = revision

    def put(self, key: StoredKey) -> None:
        """A key this process has just written (the others see it at their next look)."""
        self.by_id = {**self.by_id, key.id: key}
        self.by_digest = {**self.by_digest, key.digest: key}

    def find(self, digest: bytes) -> StoredKey | None:
        """The key whose SHA-256 is `digest`."""
        return self.by_digest.get(digest)

    def get(self, ident: str) -> StoredKey | None:
        return self.by_id.get(ident)

    @property
    def closed(self) -> bool:
        """Whether the store has ever held a key: then every client route needs one."""
        return bool(self.by_id)

    def __len__(self) -> int:
        return len(self.by_id)
