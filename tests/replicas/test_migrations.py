"""The schema's migrations on real PostgreSQL and on SQLite: from an empty database, from the schema
the first release made with `create_all`, by several replicas at once, and by `salora db upgrade`.
After each, the database matches the models exactly (Alembic's own comparison)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, inspect, select

import gateway.adapters.registry  # noqa: F401  (the tables)
import gateway.tenants  # noqa: F401
from gateway.adapters.registry import AdapterRow, Registry, State
from gateway.db import Base, connect, open_db, upgrade
from gateway.migrations import current, head
from salora_cli.main import main


def _differences(engine: Engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def _first_release_schema(engine: Engine) -> None:
    """The tables as the first release made them: create_all of the models, less what came since."""
    old = MetaData()
    for table in Base.metadata.sorted_tables:
        copy = table.to_metadata(old)
        if table.name == "adapters":
            for column in ("lease_owner", "lease_until"):
                copy._columns.remove(copy.c[column])
    old.create_all(engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    return request.getfixturevalue("pg_url")


def test_an_empty_database_is_built_by_the_migrations(url):
    engine = connect(url)
    assert upgrade(engine) == head()
    assert _differences(engine) == []
    assert upgrade(engine) == head()  # a second run has nothing to do


def test_the_first_releases_schema_is_stamped_and_upgraded_keeping_its_rows(url):
    engine = connect(url)
    _first_release_schema(engine)
    assert "lease_owner" not in {c["name"] for c in inspect(engine).get_columns("adapters")}
    with engine.begin() as connection:
        connection.execute(Base.metadata.tables["tenants"].insert().values(
            name="acme", key_sha256="0" * 64, adapters=["a"], rpm=5, tpm=None, created_at=datetime.now(UTC)))
    assert upgrade(engine) == head()
    assert _differences(engine) == []
    with engine.connect() as connection:
        assert connection.execute(select(Base.metadata.tables["tenants"].c.name)).scalars().all() == ["acme"]
        assert current(connection) == head()
    sessions = open_db(url)  # and the registry works on the result
    record = Registry(sessions).create("a1", source="upload", tenants=[], base_model="m", actor="t")
    assert Registry(sessions).take_lease(record.id, "r1", 30) and not Registry(sessions).take_lease(record.id, "r2", 30)


def test_replicas_starting_at_once_migrate_once(pg_url):
    """Three threads upgrade one empty database at the same moment: the advisory lock serialises them,
    none fails, and the schema is built once."""
    engines, results, errors = [connect(pg_url) for _ in range(3)], [], []
    barrier = threading.Barrier(3)

    def run(engine: Engine) -> None:
        barrier.wait()
        try:
            results.append(upgrade(engine))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and results == [head()] * 3
    assert _differences(engines[0]) == []


def _salora_db(monkeypatch, capsys, url: str, state: Path, action: str) -> tuple[int, str, str]:
    """`salora db <action>` through the console script's entry point, in this process."""
    monkeypatch.setenv("SALORA_DB_URL", url)
    monkeypatch.setenv("SALORA_STATE_DIR", str(state))
    code = main(["db", action])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_salora_db_upgrade_and_current(url, tmp_path, monkeypatch, capsys):
    code, out, _ = _salora_db(monkeypatch, capsys, url, tmp_path, "current")
    assert code == 0 and "revision none" in out
    code, out, err = _salora_db(monkeypatch, capsys, url, tmp_path, "upgrade")
    assert code == 0 and f"revision {head()}" in out, err
    assert _differences(connect(url)) == []


def test_salora_db_reports_an_unreachable_database_in_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = _salora_db(monkeypatch, capsys, "postgresql://nobody@127.0.0.1:9/none", tmp_path, "upgrade")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("salora db: error: database postgresql+psycopg://nobody@127.0.0.1:9/none: ")


def test_the_registry_keeps_one_active_adapter_per_name_on_postgresql(pg_url):
    registry = Registry(open_db(pg_url))
    first = registry.create("dup", source="upload", tenants=[], base_model="m", actor="t")
    with pytest.raises(gateway.adapters.registry.NameInUse):
        registry.create("dup", source="upload", tenants=[], base_model="m", actor="t")
    registry.transition(first.id, State.REJECTED, actor="t", action="reject")
    registry.create("dup", source="upload", tenants=[], base_model="m", actor="t")
    with open_db(pg_url)() as session:
        assert len(session.scalars(select(AdapterRow).where(AdapterRow.name == "dup")).all()) == 2
