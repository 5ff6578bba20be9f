"""The first release's schema: tenants, adapters, canary runs, the audit log, the base answers cache.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE = sa.text("state NOT IN ('rejected', 'retired')")


def _when(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("adapters", sa.JSON, nullable=False),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        _when("created_at"),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("path", sa.Text),
        sa.Column("rank", sa.Integer),
        sa.Column("target_modules", sa.JSON, nullable=False),
        sa.Column("size_bytes", sa.Integer),
        sa.Column("tenants", sa.JSON, nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("flagged", sa.Text),
        sa.Column("last_run_id", sa.String(40)),
        _when("created_at"),
        _when("updated_at"),
    )
    op.create_index("ix_adapters_name", "adapters", ["name"])
    op.create_index("ix_adapters_active_name", "adapters", ["name"], unique=True, sqlite_where=ACTIVE,
                    postgresql_where=ACTIVE)
    op.create_table(
        "canary_runs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("adapter_id", sa.String(40), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("result", sa.String(8), nullable=False),
        _when("started_at"),
        _when("finished_at"),
        sa.Column("report", sa.JSON, nullable=False),
    )
    op.create_index("ix_canary_runs_adapter_id", "canary_runs", ["adapter_id"])
    op.create_table(
        "adapter_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("adapter_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        _when("at"),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16)),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_adapter_events_adapter_id", "adapter_events", ["adapter_id"])
    op.create_table(
        "canary_base_answers",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("answers", sa.JSON, nullable=False),
        _when("created_at"),
    )


def downgrade() -> None:
    for table in ("canary_base_answers", "adapter_events", "canary_runs", "adapters", "tenants"):
        op.drop_table(table)
