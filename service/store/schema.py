"""The store's tables (SQLAlchemy Core). A change here comes with an Alembic revision in `migrations/`;
`tests/unit/test_store.py` checks that the migrations build exactly these tables."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, MetaData, String, Table, Text

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
