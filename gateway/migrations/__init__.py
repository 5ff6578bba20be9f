"""The schema's history as Alembic migrations. A database made by an earlier release with
`create_all` (tables present, no `alembic_version`) is stamped at the first revision, which is that
schema, and upgraded from there; an empty one is built by running every revision."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

HERE = Path(__file__).resolve().parent
BASELINE = "0001"  # the schema of the first release, made by create_all


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_connection(connection: Connection) -> str:
    """Upgrade the database behind `connection` to the newest revision (see the module's docstring)."""
    cfg = config(connection)
    if current(connection) is None and inspect(connection).has_table("adapters"):
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, "head")
    connection.commit()
    revision = current(connection)
    assert revision is not None
    return revision
