"""Fixtures of the replica tests: one PostgreSQL server for the session (a fresh database per test) and
a Redis server per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.conftest import gateway_model_dir  # noqa: F401
from loadtests.servers import Postgres, Redis


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    # Not under pytest's temporary root: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="salora-postgres-"))
    server = Postgres.start(root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A database of its own for each test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
