"""Per-tenant requests-per-minute and tokens-per-minute limits, in memory (one gateway replica).

Each limit is a token bucket holding at most one window's allowance and refilling continuously, so
a tenant may burst up to its limit and then proceeds at the limit's rate. Requests are charged on
admission; tokens are charged when the answer is done (their number is not known before), so the
token bucket may go negative and then blocks the tenant until it has refilled."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.tenants import Tenant


@dataclass(slots=True)
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float, rate: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now


class RateLimiter:
    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._buckets: dict[tuple[str, str, int], _Bucket] = {}

    def _bucket(self, tenant: Tenant, kind: str, limit: int) -> _Bucket:
        key = (tenant.name, kind, limit)  # a changed limit starts a fresh bucket
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(limit, limit, self._clock())
        else:
            bucket.refill(self._clock(), limit / self._window)
        return bucket

    def admit(self, tenant: Tenant) -> tuple[str, int] | None:
        """None if the request may proceed (and is charged), else (which limit, seconds to wait)."""
        for kind, limit in (("tokens", tenant.tpm), ("requests", tenant.rpm)):
            if limit is not None:
                bucket = self._bucket(tenant, kind, limit)
                if bucket.level < 1:
                    return kind, max(1, math.ceil((1 - bucket.level) * self._window / limit))
        if tenant.rpm is not None:
            self._bucket(tenant, "requests", tenant.rpm).level -= 1
        return None

    def charge_tokens(self, tenant: Tenant, tokens: int) -> None:
        if tenant.tpm is not None:
            self._bucket(tenant, "tokens", tenant.tpm).level -= tokens
