"""Tenants: who may call, which adapters, how much. Stored in the database with only a hash of each
API key; served from an in-memory copy so the request path never queries the database. Every write
announces itself (gateway/changes.py), and every replica reloads its copy when told."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Integer, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from gateway.db import Base
from gateway.settings import TenantConfig

KEY_PREFIX = "sk-salora-"
INDEX_CHARS = 16  # hex digits of the key hash used as a lookup index; the full hash is then compared


class TenantRow(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    adapters: Mapped[list[str]] = mapped_column(JSON)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_sha256: str
    adapters: frozenset[str]  # adapter names, or {"*"} for all
    rpm: int | None = None
    tpm: int | None = None
    created_at: datetime | None = None

    def may_use(self, adapter: str) -> bool:
        return "*" in self.adapters or adapter in self.adapters


ANONYMOUS = Tenant("anonymous", "", frozenset({"*"}))  # the caller when the gateway runs without auth


class TenantExists(Exception):
    pass


class UnknownTenant(Exception):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A 256-bit random key; only its SHA-256 is stored (a fast hash suffices at this entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _tenant(row: TenantRow) -> Tenant:
    created = row.created_at
    if created is not None and created.tzinfo is None:  # SQLite keeps no zone; every time stored is UTC
        created = created.replace(tzinfo=UTC)
    return Tenant(row.name, row.key_sha256, frozenset(row.adapters), row.rpm, row.tpm, created)


class TenantStore:
    """Tenants in the database, mirrored in memory. Writers hold a lock and swap in new dicts, so
    readers on the event loop see a consistent snapshot without locking."""

    def __init__(self, sessions: sessionmaker[Session],
                 announce: Callable[[Session, str], None] = lambda _session, _topic: None) -> None:
        self._sessions = sessions
        self._announce = announce
        self._lock = threading.Lock()
        self._by_name: dict[str, Tenant] = {}
        self._by_index: dict[str, Tenant] = {}
        self._reload()

    def reload(self) -> None:
        """Read every tenant again (another replica changed one)."""
        with self._lock:
            self._reload()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction that tells the other replicas, then this replica's fresh copy."""
        with self._lock:
            with self._sessions.begin() as session:
                yield session
                self._announce(session, "tenants")
            self._reload()

    def _reload(self) -> None:
        with self._sessions() as session:
            tenants = [_tenant(row) for row in session.scalars(select(TenantRow))]
        self._by_name = {t.name: t for t in tenants}
        self._by_index = {t.key_sha256[:INDEX_CHARS]: t for t in tenants}

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning `key`, found by a prefix of its hash, confirmed in constant time."""
        digest = hash_key(key)
        tenant = self._by_index.get(digest[:INDEX_CHARS])
        if tenant is not None and hmac.compare_digest(tenant.key_sha256, digest):
            return tenant
        return None

    def get(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def all(self) -> list[Tenant]:
        return sorted(self._by_name.values(), key=lambda t: t.name)

    def create(self, name: str, adapters: Iterable[str], rpm: int | None, tpm: int | None) -> tuple[Tenant, str]:
        """A new tenant and its key; the key is returned this once and never stored."""
        key = new_key()
        with self._write() as session:
            if session.get(TenantRow, name) is not None:
                raise TenantExists(name)
            session.add(TenantRow(name=name, key_sha256=hash_key(key), adapters=sorted(set(adapters)), rpm=rpm,
                                  tpm=tpm, created_at=datetime.now(UTC)))
        return self._by_name[name], key

    def rotate(self, name: str) -> str:
        """Replace a tenant's key; the old key stops working at once."""
        key = new_key()
        with self._write() as session:
            row = session.get(TenantRow, name)
            if row is None:
                raise UnknownTenant(name)
            row.key_sha256 = hash_key(key)
        return key

    def delete(self, name: str) -> None:
        with self._write() as session:
            if session.execute(delete(TenantRow).where(TenantRow.name == name)).rowcount == 0:  # type: ignore[attr-defined]
                raise UnknownTenant(name)

    def grant(self, adapter: str, names: Iterable[str]) -> None:
        """Let the named tenants call `adapter` (the adapter lifecycle grants on promotion and at start,
        since a config tenant's list is rewritten from the config at every start)."""
        with self._write() as session:
            for name in names:
                row = session.get(TenantRow, name)
                if row is not None and adapter not in row.adapters:
                    row.adapters = sorted({*row.adapters, adapter})

    def revoke(self, adapter: str) -> None:
        """Take `adapter` off every tenant's list (a retired name may later be reused for other weights)."""
        with self._write() as session:
            for row in session.scalars(select(TenantRow)):
                if adapter in row.adapters:
                    row.adapters = [a for a in row.adapters if a != adapter]

    def put_configured(self, configs: Iterable[TenantConfig]) -> None:
        """Insert or overwrite the tenants declared in the settings (the config file wins at start)."""
        with self._write() as session:
            for c in configs:
                row = session.get(TenantRow, c.name) or TenantRow(name=c.name, created_at=datetime.now(UTC))
                row.key_sha256, row.adapters, row.rpm, row.tpm = c.key_sha256, sorted(set(c.adapters)), c.rpm, c.tpm
                session.add(row)
