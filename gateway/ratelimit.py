"""Per-tenant requests-per-minute and tokens-per-minute limits, exact over any window.

Each limit keeps a log of what was admitted in the last `window_s` seconds (a sliding window, not a
refilling bucket: a bucket lets a tenant take twice its limit within one window, full bucket then
refill). Tokens are *reserved* at admission, the prompt's upper bound plus `max_tokens`, because the
answer's length is not known before it is generated and charging afterwards lets concurrent requests
overshoot; when the answer is done the reservation is settled to what was actually counted and the
rest refunded. So the tokens a tenant is served by requests admitted in any window never exceed its
tpm, whatever the concurrency.

Logs are keyed by tenant name only: deleting and re-creating a tenant, or changing its limits, keeps
what it already used in the window (a fresh log would be a fresh allowance).

This limiter lives in one process. Several replicas share theirs through Redis
(gateway/shared_limits.py), which keeps the same logs with the same rules, atomically."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.tenants import Tenant


@dataclass(slots=True, eq=False)
class _Entry:
    at: float
    amount: float


@dataclass(slots=True)
class _Log:
    """What was admitted in the window, oldest first, and its running total."""

    entries: deque[_Entry] = field(default_factory=deque)
    total: float = 0.0
    horizon: float = -math.inf  # entries at or before this time have left the log

    def expire(self, since: float) -> None:
        self.horizon = max(self.horizon, since)
        while self.entries and self.entries[0].at <= since:
            self.total -= self.entries.popleft().amount
        if not self.entries:
            self.total = 0.0  # no float drift survives an empty window

    def wait(self, need: float, limit: float, now: float, window: float) -> float:
        """Seconds until `need` more fits under `limit`."""
        excess = self.total + need - limit
        for entry in self.entries:
            excess -= entry.amount
            if excess <= 0:
                return entry.at + window - now
        return window


@dataclass(frozen=True, slots=True)
class Headroom:
    """What a tenant has left, for the `x-ratelimit-*` headers."""

    kind: str
    limit: int
    remaining: int
    reset_s: float  # until the whole limit is available again


@dataclass(frozen=True, slots=True)
class Limited:
    """Why a request was not admitted: which limit, when to retry, and whether it ever can be."""

    kind: str  # "requests" or "tokens"
    retry_after: int  # whole seconds
    limit: int
    requested: int = 1
    too_large: bool = False  # the request alone needs more than the limit: retrying cannot help
    unavailable: bool = False  # the shared limits cannot be consulted (gateway/shared_limits.py)
    headroom: tuple[Headroom, ...] = ()


@dataclass(slots=True)
class Reservation:
    """An admitted request's charge and the headroom left after it; `settle` replaces the token
    estimate by the real count, once (a limiter's own function does the bookkeeping)."""

    headroom: tuple[Headroom, ...] = ()
    on_settle: Callable[[int], None] | None = None
    settled: bool = False

    def settle(self, tokens: int) -> None:
        if self.settled or self.on_settle is None:
            return
        self.settled = True
        self.on_settle(tokens)


class Limiter(Protocol):
    """Admission by rpm and tpm: this module's in-process limiter, or the one shared through Redis."""

    async def admit(self, tenant: Tenant, tokens: int = 0) -> Reservation | Limited: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


class RateLimiter:
    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._logs: dict[tuple[str, str], _Log] = {}

    @property
    def window_s(self) -> float:
        return self._window

    def _log(self, tenant: str, kind: str, now: float) -> _Log:
        log = self._logs.get((tenant, kind))
        if log is None:
            log = self._logs[(tenant, kind)] = _Log()
        else:
            log.expire(now - self._window)
        return log

    async def admit(self, tenant: Tenant, tokens: int = 0) -> Reservation | Limited:
        return self.admit_now(tenant, tokens)

    def admit_now(self, tenant: Tenant, tokens: int = 0, share: int = 1) -> Reservation | Limited:
        """Admit and charge one request reserving `tokens` (prompt bound + max_tokens), or say which
        limit stops it. Nothing is charged unless every limit admits the request. `share` divides
        every limit (the shared limiter's fallback: each of N replicas admits 1/N)."""
        now = self._clock()
        checks = [("requests", _part(tenant.rpm, share), 1), ("tokens", _part(tenant.tpm, share), tokens)]
        logs = []
        for kind, limit, need in checks:
            if limit is None:
                continue
            if need > limit:
                return Limited(kind, math.ceil(self._window), limit, need, too_large=True)
            log = self._log(tenant.name, kind, now)
            if log.total + need > limit:
                wait = log.wait(need, limit, now, self._window)
                return Limited(kind, max(1, math.ceil(wait)), limit, need, headroom=self._headroom(checks, tenant, now))
            logs.append((kind, limit, log, need))
        reserved = None
        headroom = []  # as `_headroom` gives it, from the logs at hand (no second lookup and expiry per kind)
        for kind, limit, log, need in logs:
            entry = _Entry(now, need)
            log.entries.append(entry)
            log.total += need
            if kind == "tokens":
                reserved = (log, entry)
            headroom.append(Headroom(kind, limit, max(0, math.floor(limit - log.total)),
                                     max(0.0, entry.at + self._window - now)))
        return Reservation(tuple(headroom), _settler(*reserved) if reserved else None)

    def _headroom(self, checks: list[tuple[str, int | None, int]], tenant: Tenant, now: float) -> tuple[Headroom, ...]:
        out = []
        for kind, limit, _ in checks:
            if limit is None:
                continue
            log = self._log(tenant.name, kind, now)
            reset = log.entries[-1].at + self._window - now if log.entries else 0.0
            out.append(Headroom(kind, limit, max(0, math.floor(limit - log.total)), max(0.0, reset)))
        return tuple(out)

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def _part(limit: int | None, share: int) -> int | None:
    return None if limit is None else max(1, limit // share) if share > 1 else limit


def _settler(log: _Log, entry: _Entry) -> Callable[[int], None]:
    def settle(tokens: int) -> None:
        if entry.at > log.horizon:  # still counted in the window
            log.total += tokens - entry.amount
        entry.amount = tokens

    return settle
