"""The gateway's database (SQLite by default, any SQLAlchemy URL for several replicas): one declarative
base for every table, so the tenant store and the adapter registry share one file and one engine."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    pass


def open_db(url: str) -> sessionmaker[Session]:
    """Create the engine (and the SQLite file's directory) and every table not yet there."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


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
