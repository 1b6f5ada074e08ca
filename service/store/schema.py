"""The store's tables (SQLAlchemy Core). A change here comes with an Alembic revision in `migrations/`;
`tests/unit/test_store.py` checks that the migrations build exactly these tables."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Date, DateTime, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

# Topics whose rows every gateway process follows; each write bumps its topic's revision in the same
# transaction, so a process sees a change by reading one small table.
revisions = Table(
    "revisions",
    metadata,
    Column("topic", String(32), primary_key=True),
    Column("revision", BigInteger, nullable=False),
)

# Fine-tuned variants registered at runtime (the models file declares the others).
adapters = Table(
    "adapters",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("path", Text, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("chat_template", Text, nullable=True),
    Column("description", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# API keys managed at runtime (issue 22): the secret is never stored, only its SHA-256; a revoked key's
# row stays (its usage keeps a name). Policies are fixed at creation: a new policy is a new key.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # the first 16 bytes of the key's SHA-256, in hex
    Column("digest", String(64), nullable=False, unique=True),  # the whole SHA-256, in hex
    Column("prefix", String(16), nullable=False),  # the key's first characters, to recognise it
    Column("name", String(128), nullable=False),
    Column("models", Text, nullable=True),  # JSON list of served names; NULL: any
    Column("kinds", Text, nullable=True),  # JSON list of kinds; NULL: any
    Column("rate_limit", String(64), nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("budget_tokens", BigInteger, nullable=True),
    Column("budget_period", String(8), nullable=True),  # day | month | none
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# The gateway processes that hold allowances (see service/store/ledger.py), and when each last
# renewed its lease (milliseconds since the epoch); a lapsed one's allowances are reclaimed.
holders = Table(
    "holders",
    metadata,
    Column("holder", String(32), primary_key=True),
    Column("renewed_ms", BigInteger, nullable=False),
    Column("reclaimed_ms", BigInteger, nullable=True),
)

# What each process holds of a key's limit (tokens of its budget, requests of its rate, slots of its
# concurrency), written as absolute values by that process alone.
key_allowances = Table(
    "key_allowances",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("resource", String(16), primary_key=True),
    Column("holder", String(32), primary_key=True),
    Column("held", BigInteger, nullable=False),
    Column("wanted_ms", BigInteger, nullable=True),  # when this process was last refused a grant
)

# What each process spent of a key's limit per bucket of time (a budget's period, 1/60 of a rate's
# window), absolute values written by that process alone (a retried write counts nothing twice).
key_consumption = Table(
    "key_consumption",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("resource", String(16), primary_key=True),
    Column("holder", String(32), primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("amount", BigInteger, nullable=False),
)

# Usage per key, served model and day (UTC), one row per gateway process (absolute totals written by
# that process alone, so a write retried after an unclear failure counts nothing twice).
usage = Table(
    "usage",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("holder", String(32), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("tokens_in", BigInteger, nullable=False),
    Column("tokens_out", BigInteger, nullable=False),
    Index("usage_by_day", "day"),
)
