"""API keys managed at runtime, the allowances that hold their limits across processes and pods, and usage.

Revision ID: 0002_tenants
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_tenants"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("models", sa.Text, nullable=True),
        sa.Column("kinds", sa.Text, nullable=True),
        sa.Column("rate_limit", sa.String(64), nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        sa.Column("budget_tokens", sa.BigInteger, nullable=True),
        sa.Column("budget_period", sa.String(8), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "holders",
        sa.Column("holder", sa.String(32), primary_key=True),
        sa.Column("renewed_ms", sa.BigInteger, nullable=False),
        sa.Column("reclaimed_ms", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "key_allowances",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("resource", sa.String(16), primary_key=True),
        sa.Column("holder", sa.String(32), primary_key=True),
        sa.Column("held", sa.BigInteger, nullable=False),
        sa.Column("wanted_ms", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "key_consumption",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("resource", sa.String(16), primary_key=True),
        sa.Column("holder", sa.String(32), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("amount", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("holder", sa.String(32), primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("tokens_in", sa.BigInteger, nullable=False),
        sa.Column("tokens_out", sa.BigInteger, nullable=False),
    )
    op.create_index("usage_by_day", "usage", ["day"])


def downgrade() -> None:
    op.drop_index("usage_by_day", table_name="usage")
    for table in ("usage", "key_consumption", "key_allowances", "holders", "api_keys"):
        op.drop_table(table)
