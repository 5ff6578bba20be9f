"""The adapter admin API's bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from gateway.adapters.registry import AdapterRecord, CanaryRun, Event


class CanarySummary(BaseModel):
    """One canary run without its probe list."""

    id: str
    trigger: str  # upload | manual | schedule | retry | restart
    result: str  # pass | fail | error
    started_at: datetime
    finished_at: datetime
    reasons: list[str] = []
    error: str | None = None
    rates: dict[str, Any] | None = None  # {harmful|benign: {candidate|base: {n, refusal_rate, ...}}}

    @classmethod
    def of(cls, run: CanaryRun) -> CanarySummary:
        r = run.report
        return cls(id=run.id, trigger=run.trigger, result=run.result, started_at=run.started_at,
                   finished_at=run.finished_at, reasons=r.get("reasons", []), error=r.get("error"), rates=r.get("rates"))


class AdapterInfo(BaseModel):
    id: str
    name: str
    state: str
    serving: bool = Field(description="clients can call it now")
    canary_running: bool
    source: str = Field(description="upload, checkpoint (exported on arrival) or config")
    sha256: str | None
    rank: int | None
    target_modules: list[str]
    size_bytes: int | None
    tenants: list[str] = Field(description="the tenants the upload granted it to")
    callers: list[str] = Field(description="every tenant that can call it while it is live: those granted it, and "
                               "those allowed every adapter (\"*\")")
    base_model: str
    reason: str | None = Field(description="why it is in its state (a rejection's failed criteria, a retirement)")
    flagged: str | None = Field(description="a live adapter that failed a re-probe: the failed criteria")
    created_at: datetime
    updated_at: datetime
    canary: CanarySummary | None = Field(description="the latest canary run")

    @classmethod
    def of(cls, record: AdapterRecord, serving: bool, running: bool, last: CanaryRun | None,
           callers: list[str]) -> AdapterInfo:
        return cls(id=record.id, name=record.name, state=record.state.value, serving=serving, canary_running=running,
                   source=record.source, sha256=record.sha256, rank=record.rank, target_modules=record.target_modules,
                   size_bytes=record.size_bytes, tenants=record.tenants, callers=callers, base_model=record.base_model,
                   reason=record.reason, flagged=record.flagged, created_at=record.created_at,
                   updated_at=record.updated_at, canary=CanarySummary.of(last) if last else None)


class EventInfo(BaseModel):
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str | None
    reason: str | None

    @classmethod
    def of(cls, e: Event) -> EventInfo:
        return cls(at=e.at, actor=e.actor, action=e.action, from_state=e.from_state, to_state=e.to_state, reason=e.reason)


class AdapterDetail(AdapterInfo):
    report: dict[str, Any] | None = Field(description="the latest canary report in full: every probe, answer and verdict")
    runs: list[CanarySummary]
    audit: list[EventInfo]


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterInfo]


class ForceLive(BaseModel):
    """An admin override of a rejection: recorded with who and why."""

    model_config = {"extra": "forbid", "strict": True}

    actor: str = Field(min_length=1, max_length=256, description="who takes responsibility (a person, not a team)")
    reason: str = Field(min_length=1, max_length=2000)


class Retire(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    actor: str = Field(default="admin", min_length=1, max_length=256)
    reason: str | None = Field(default=None, max_length=2000)
