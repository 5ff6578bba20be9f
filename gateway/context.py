"""Everything a request handler needs, built once at start-up and reached through `Depends(context)`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gateway.engines.base import Engine
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.settings import Settings
from gateway.tenants import TenantStore
from salora.judge import Judge


@dataclass
class Context:
    settings: Settings
    engine: Engine
    tenants: TenantStore
    limiter: RateLimiter
    metrics: Metrics
    judge: Judge
    admin_key_sha256: str | None  # None: the admin API is off
    anonymous: bool  # no admin key and no tenants at start: every caller is the anonymous tenant
    started_at: int  # Unix time, the `created` of the models listed
    tasks: set[asyncio.Task] = field(default_factory=set)  # detached work (judging), kept alive until done

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` detached from any request, so no response or connection waits for it."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def context(request: Request) -> Context:
    return request.app.state.context
