"""Per-tenant caps on open streamed answers. A stream holds an engine row and a connection for as long
as the client keeps reading, so one tenant with many slow readers could occupy the whole batch; the
cap answers the next stream with a 429 instead. Single event loop: no lock needed.

Replicas count one tenant's streams together through Redis (gateway/shared_limits.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Slots(Protocol):
    async def acquire(self, tenant: str, limit: int) -> Callable[[], None] | None: ...


class StreamSlots:
    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    async def acquire(self, tenant: str, limit: int) -> Callable[[], None] | None:
        return self.acquire_now(tenant, limit)

    def acquire_now(self, tenant: str, limit: int) -> Callable[[], None] | None:
        """A release function for one slot of `tenant`, or None when it already has `limit` open. The
        release is idempotent, so every way a stream can end may call it."""
        if self._open.get(tenant, 0) >= limit:
            return None
        self._open[tenant] = self._open.get(tenant, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._open[tenant] - 1
                if left:
                    self._open[tenant] = left
                else:
                    del self._open[tenant]

        return release

    def open(self, tenant: str) -> int:
        return self._open.get(tenant, 0)
