"""Everything a request handler needs, built once at start-up and reached through `Depends(context)`."""

from __future__ import annotations

from dataclasses import dataclass

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

    def adapter_label(self, model: str) -> str:
        """`model` as a metric label: the base id or a loaded adapter, else `other`."""
        return model if model == self.engine.model_id or model in self.engine.adapters() else "other"


def context(request: Request) -> Context:
    return request.app.state.context
