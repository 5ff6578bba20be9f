"""The gateway's database: SQLite by default (one process), PostgreSQL (psycopg 3) for several replicas.
One declarative base for every table, so the tenant store and the adapter registry share one engine.

The schema is owned by Alembic migrations (gateway/migrations), run at start under a lock, so that
replicas starting together upgrade it once; `salora db upgrade` runs them by hand."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

MIGRATION_LOCK = 0x5A104A  # the PostgreSQL advisory lock id held while migrations run


class Base(DeclarativeBase):
    pass


def normalise_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def connect(url: str) -> Engine:
    """An engine for `url` (the SQLite file's directory made first), without touching the schema."""
    url = normalise_url(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def open_db(url: str) -> sessionmaker[Session]:
    """Connect, bring the schema to the newest migration, and hand out sessions."""
    engine = connect(url)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)


def upgrade(engine: Engine) -> str:
    """Run every migration not yet applied, under a lock; returns the revision now current."""
    from gateway.migrations import upgrade_connection  # alembic is only imported when the schema is checked

    with _migration_lock(engine) as connection:
        return upgrade_connection(connection)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """PostgreSQL: a session advisory lock (replicas starting at once wait for the first). SQLite: an
    exclusive lock on a file beside the database (processes on one machine)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            try:
                yield connection
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                connection.commit()
        return
    database = engine.url.database
    lock_path = Path(f"{database}.migrate.lock") if database and database != ":memory:" else None
    with engine.connect() as connection:
        if lock_path is None:
            yield connection
            return
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield connection
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _sqlite_pragmas(connection: object, _record: object) -> None:
    """WAL lets readers proceed while an admin call writes; wait instead of failing on a lock."""
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def close_db(sessions: sessionmaker[Session]) -> None:
    bind = sessions.kw["bind"]
    assert isinstance(bind, Engine)
    bind.dispose()
