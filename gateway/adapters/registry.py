"""The adapter registry: every adapter's lifecycle state, its canary runs with their full reports, an
audit log of every transition (who and why), and the base model's cached probe answers. Kept in the
gateway's database (`gateway.db`), so a restarted gateway, or another replica on the same database,
sees the same adapters.

States: uploaded -> validating -> probing -> live | rejected; live -> retired. An upload that fails
(validation, storage, the engine) ends rejected with the reason and without files; an admin may
retire a probing adapter (its canary is cancelled). A rejected adapter that has files can be probed
again (-> probing) or forced live by an admin (-> live, audited). At most one adapter per
name is active (not rejected or retired): a partial unique index enforces it in the database."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from gateway.db import Base


class State(StrEnum):
    UPLOADED = "uploaded"
    VALIDATING = "validating"
    PROBING = "probing"
    LIVE = "live"
    REJECTED = "rejected"
    RETIRED = "retired"


INACTIVE = (State.REJECTED, State.RETIRED)
TRANSITIONS: dict[State, set[State]] = {
    State.UPLOADED: {State.VALIDATING, State.REJECTED},
    State.VALIDATING: {State.PROBING, State.REJECTED},
    State.PROBING: {State.LIVE, State.REJECTED, State.RETIRED},
    State.LIVE: {State.RETIRED},
    State.REJECTED: {State.PROBING, State.LIVE},
    State.RETIRED: set(),
}
_ACTIVE_SQL = text("state NOT IN ('rejected', 'retired')")


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_active_name", "name", unique=True, sqlite_where=_ACTIVE_SQL,
                            postgresql_where=_ACTIVE_SQL),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))  # upload | checkpoint | config
    sha256: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(Text)  # a config adapter's own directory (uploads live in the store)
    rank: Mapped[int | None] = mapped_column(Integer)
    target_modules: Mapped[list[str]] = mapped_column(JSON, default=list)
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    tenants: Mapped[list[str]] = mapped_column(JSON, default=list)
    base_model: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str | None] = mapped_column(Text)  # why the adapter is in its state
    flagged: Mapped[str | None] = mapped_column(Text)  # a live adapter that failed a re-probe: why
    last_run_id: Mapped[str | None] = mapped_column(String(40))
    lease_owner: Mapped[str | None] = mapped_column(String(64))  # the replica running its canary
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # ... while it renews
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CanaryRunRow(Base):
    __tablename__ = "canary_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(40), index=True)
    trigger: Mapped[str] = mapped_column(String(16))  # upload | manual | schedule | retry | restart
    result: Mapped[str] = mapped_column(String(8))  # pass | fail | error
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)


class AdapterEventRow(Base):
    """The audit log."""

    __tablename__ = "adapter_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)


class BaseAnswersRow(Base):
    """The base model's greedy probe answers, per base identity and probe set (see CanaryRunner.cache_key)."""

    __tablename__ = "canary_base_answers"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    answers: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    name: str
    state: State
    source: str
    sha256: str | None
    path: str | None
    rank: int | None
    target_modules: list[str]
    size_bytes: int | None
    tenants: list[str]
    base_model: str
    reason: str | None
    flagged: str | None
    last_run_id: str | None
    created_at: datetime
    updated_at: datetime
    lease_owner: str | None = None
    lease_until: datetime | None = None

    @classmethod
    def of(cls, row: AdapterRow) -> AdapterRecord:
        return cls(row.id, row.name, State(row.state), row.source, row.sha256, row.path, row.rank,
                   list(row.target_modules or []), row.size_bytes, list(row.tenants or []), row.base_model,
                   row.reason, row.flagged, row.last_run_id, _utc(row.created_at), _utc(row.updated_at),
                   row.lease_owner, _utc(row.lease_until) if row.lease_until else None)

    def leased(self) -> bool:
        """A replica is running this adapter's canary and has not let its lease expire."""
        return self.lease_owner is not None and self.lease_until is not None and self.lease_until >= _now()


@dataclass(frozen=True)
class CanaryRun:
    id: str
    adapter_id: str
    trigger: str
    result: str
    started_at: datetime
    finished_at: datetime
    report: dict[str, Any]


@dataclass(frozen=True)
class Event:
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str | None
    reason: str | None


def _run(row: CanaryRunRow, with_probes: bool = True) -> CanaryRun:
    report = row.report if with_probes else {k: v for k, v in row.report.items() if k != "probes"}
    return CanaryRun(row.id, row.adapter_id, row.trigger, row.result, _utc(row.started_at), _utc(row.finished_at), report)


class NameInUse(Exception):
    pass


class BadTransition(Exception):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time stored here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Registry:
    """Synchronous database access; the lifecycle calls it from worker threads. Every state change is
    announced to the other replicas (gateway/changes.py) in its own transaction."""

    def __init__(self, sessions: sessionmaker[Session],
                 announce: Callable[[Session, str], None] = lambda _session, _topic: None) -> None:
        self._sessions = sessions
        self._announce = announce

    def create(self, name: str, *, source: str, tenants: list[str], base_model: str, actor: str,
               state: State = State.UPLOADED, path: str | None = None, sha256: str | None = None,
               record_id: str | None = None) -> AdapterRecord:
        now = _now()
        row = AdapterRow(id=record_id or uuid.uuid4().hex, name=name, state=state.value, source=source,
                         sha256=sha256, path=path, tenants=sorted(set(tenants)), target_modules=[],
                         base_model=base_model, created_at=now, updated_at=now)
        try:
            with self._sessions.begin() as session:
                session.add(row)
                session.flush()
                session.add(AdapterEventRow(adapter_id=row.id, name=name, at=now, actor=actor, action="upload"
                                            if source != "config" else "config", to_state=state.value))
                self._announce(session, "adapters")
        except IntegrityError:
            raise NameInUse(name) from None
        return AdapterRecord.of(row)

    def transition(self, record_id: str, to: State, *, actor: str, action: str, reason: str | None = None,
                   **fields: Any) -> AdapterRecord:
        """Move to state `to` (which must be allowed from the current one), update `fields`, log the event."""
        now = _now()
        try:
            with self._sessions.begin() as session:
                row = session.get(AdapterRow, record_id, with_for_update=True)
                if row is None:
                    raise KeyError(record_id)
                current = State(row.state)
                if to is not current and to not in TRANSITIONS[current]:
                    raise BadTransition(f"{row.name} is {current}, it cannot become {to}")
                for key, value in fields.items():
                    setattr(row, key, value)
                row.state, row.updated_at = to.value, now
                if to is not current or reason is not None:
                    row.reason = reason
                session.add(AdapterEventRow(adapter_id=row.id, name=row.name, at=now, actor=actor, action=action,
                                            from_state=current.value, to_state=to.value, reason=reason))
                self._announce(session, "adapters")
        except IntegrityError:  # back to active while another adapter of that name is active
            raise NameInUse(record_id) from None
        return AdapterRecord.of(row)

    def update(self, record_id: str, *, actor: str | None = None, action: str | None = None,
               reason: str | None = None, **fields: Any) -> AdapterRecord:
        """Change fields without a state change; with `action`, also log an event."""
        with self._sessions.begin() as session:
            row = session.get(AdapterRow, record_id)
            if row is None:
                raise KeyError(record_id)
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = _now()
            if action is not None:
                session.add(AdapterEventRow(adapter_id=row.id, name=row.name, at=row.updated_at, actor=actor or "gateway",
                                            action=action, from_state=row.state, to_state=row.state, reason=reason))
        return AdapterRecord.of(row)

    # --- the canary's lease: one replica probes an adapter at a time ---

    def take_lease(self, record_id: str, owner: str, ttl_s: float) -> bool:
        """Hold (or renew) the lease on an adapter's canary for `ttl_s`: granted when nobody holds it,
        `owner` already does, or the holder let it expire (it died). One conditional UPDATE, so two
        replicas asking at once cannot both get it."""
        now = _now()
        query = (update(AdapterRow).where(AdapterRow.id == record_id)
                 .where(or_(AdapterRow.lease_owner.is_(None), AdapterRow.lease_owner == owner,
                            AdapterRow.lease_until < now))
                 .values(lease_owner=owner, lease_until=now + timedelta(seconds=ttl_s)))
        with self._sessions.begin() as session:
            return session.execute(query).rowcount == 1  # type: ignore[attr-defined]

    def release_lease(self, record_id: str, owner: str) -> bool:
        """Give the lease back; False if `owner` no longer held it (it expired and another took it)."""
        query = (update(AdapterRow).where(AdapterRow.id == record_id, AdapterRow.lease_owner == owner)
                 .values(lease_owner=None, lease_until=None))
        with self._sessions.begin() as session:
            return session.execute(query).rowcount == 1  # type: ignore[attr-defined]

    def forget(self, record_id: str) -> None:
        """Remove every trace of an upload that never passed validation."""
        with self._sessions.begin() as session:
            session.execute(delete(AdapterEventRow).where(AdapterEventRow.adapter_id == record_id))
            session.execute(delete(CanaryRunRow).where(CanaryRunRow.adapter_id == record_id))
            session.execute(delete(AdapterRow).where(AdapterRow.id == record_id))

    def get(self, record_id: str) -> AdapterRecord | None:
        with self._sessions() as session:
            row = session.get(AdapterRow, record_id)
            return AdapterRecord.of(row) if row else None

    def find(self, name: str) -> AdapterRecord | None:
        """The adapter called `name`: the active one, else the most recent."""
        with self._sessions() as session:
            rows = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).all()
        rows = sorted(rows, key=lambda r: (r.state not in INACTIVE, r.created_at))
        return AdapterRecord.of(rows[-1]) if rows else None

    def all(self, states: tuple[State, ...] | None = None) -> list[AdapterRecord]:
        query = select(AdapterRow).order_by(AdapterRow.created_at)
        if states is not None:
            query = query.where(AdapterRow.state.in_([s.value for s in states]))
        with self._sessions() as session:
            return [AdapterRecord.of(r) for r in session.scalars(query)]

    def counts(self) -> dict[State, int]:
        with self._sessions() as session:
            got = dict(session.execute(select(AdapterRow.state, func.count()).group_by(AdapterRow.state)).all())
        return {s: int(got.get(s.value, 0)) for s in State}

    def uses(self, sha256: str) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).where(AdapterRow.sha256 == sha256)) or 0)

    def hashes(self) -> set[str]:
        """The content hashes of every record's files (the store keeps exactly these)."""
        with self._sessions() as session:
            return set(session.scalars(select(AdapterRow.sha256).where(AdapterRow.sha256.is_not(None))))

    def add_run(self, record_id: str, trigger: str, result: str, started_at: datetime,
                report: dict[str, Any]) -> CanaryRun:
        row = CanaryRunRow(id=uuid.uuid4().hex, adapter_id=record_id, trigger=trigger, result=result,
                           started_at=started_at, finished_at=_now(), report=report)
        with self._sessions.begin() as session:
            session.add(row)
            adapter = session.get(AdapterRow, record_id)
            if adapter is not None:
                adapter.last_run_id = row.id
        return _run(row)

    def run(self, run_id: str) -> CanaryRun | None:
        with self._sessions() as session:
            row = session.get(CanaryRunRow, run_id)
            return _run(row) if row else None

    def runs(self, record_id: str) -> list[CanaryRun]:
        """Every run of an adapter, oldest first, without their reports' probe lists."""
        query = select(CanaryRunRow).where(CanaryRunRow.adapter_id == record_id).order_by(CanaryRunRow.started_at)
        with self._sessions() as session:
            return [_run(r, with_probes=False) for r in session.scalars(query)]

    def events(self, record_id: str) -> list[Event]:
        query = select(AdapterEventRow).where(AdapterEventRow.adapter_id == record_id).order_by(AdapterEventRow.id)
        with self._sessions() as session:
            return [Event(_utc(e.at), e.actor, e.action, e.from_state, e.to_state, e.reason) for e in session.scalars(query)]

    # --- the canary's cache of base answers (gateway.canary.runner.BaseAnswers) ---

    def get_base_answers(self, key: str) -> dict[str, str] | None:
        with self._sessions() as session:
            row = session.get(BaseAnswersRow, key)
            return dict(row.answers) if row else None

    def put_base_answers(self, key: str, answers: dict[str, str]) -> None:
        with self._sessions.begin() as session:
            session.merge(BaseAnswersRow(key=key, answers=answers, created_at=_now()))
