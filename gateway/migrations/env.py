"""Alembic's entry point: migrations run on the connection the gateway hands over (gateway.db.upgrade)."""

from __future__ import annotations

from alembic import context

import gateway.adapters.registry  # noqa: F401  (the tables, for `alembic revision --autogenerate`)
import gateway.tenants  # noqa: F401
from gateway.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
