"""Everything a request handler needs, built once at start-up and reached through `Depends(context)`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gateway.adapters.lifecycle import Lifecycle
from gateway.catalog import Catalog
from gateway.changes import ChangeFeed
from gateway.control_tokens import ContentGuard
from gateway.engines.base import Engine
from gateway.metrics import Metrics
from gateway.ratelimit import Limiter
from gateway.settings import Settings
from gateway.streams import Slots, StreamSlots
from gateway.tenants import ANONYMOUS, TenantStore
from salora.judge import Judge


@dataclass
class Context:
    settings: Settings
    engine: Engine
    tenants: TenantStore
    limiter: Limiter  # in process, or shared by the replicas through Redis
    metrics: Metrics
    judge: Judge
    admin_key_sha256: str | None  # None: the admin API is off
    metrics_key_sha256: str | None  # besides the admin key, the bearer token /metrics accepts
    anonymous: bool  # no admin key and no tenants at start: every caller is the anonymous tenant
    started_at: int  # Unix time, the `created` of the models listed
    lifecycle: Lifecycle  # uploads, canary, promotion and retirement of adapters
    catalog: Catalog  # which models a caller may reach: routes and the admin API ask only it
    replica: str = "gateway"  # this gateway's name among its replicas (gateway/changes.py)
    feed: ChangeFeed | None = None  # other replicas' changes (PostgreSQL only)
    tasks: set[asyncio.Task] = field(default_factory=set)  # detached work (judging), kept alive until done
    streams: Slots = field(default_factory=StreamSlots)  # open streamed answers per tenant (or shared, Redis)
    # special-token spellings made plain text in message content; read from the model at start
    content_guard: ContentGuard = field(default_factory=lambda: ContentGuard(frozenset()))


    def create_known_series(self) -> None:
        """Metric series at 0 for every tenant and every model it may call (see Metrics.create_series);
        run at start and whenever a tenant or an adapter is added."""
        callers = [ANONYMOUS] if self.anonymous else self.tenants.all()
        self.metrics.create_series([(t.name, m) for t in callers for m in self.catalog.visible(t)], self.engine.name)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` detached from any request, so no response or connection waits for it."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def context(request: Request) -> Context:
    return request.app.state.context
