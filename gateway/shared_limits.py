"""Rate limits and stream slots shared by every replica through Redis: the sliding-window logs of gateway/ratelimit.py,
kept in Redis and changed by one Lua script per admission, so N replicas admit a tenant's limit in
total, not N times it. Time is Redis's own clock (`TIME`), so replicas' clocks do not matter.

Per tenant and limit (requests, tokens) there are three keys: a sorted set of reservation ids by
admission time, a hash of each reservation's amount, and their running total. Admission expires what
left the window, checks every limit, and charges all of them or none, in one round trip; settling a
finished answer (its real token count) is a second, sent without waiting.

When Redis does not answer, `limits.redis_down` decides: `closed` refuses every limited request with
a 503 (never silently unlimited), `share` lets each replica admit 1/`limits.replicas` of each limit
from a log of its own. Stream slots fall back to a cap per replica (the whole cap, or 1/replicas of
it with `share`). Either way `salora_shared_limits_up` drops to 0, `salora_limit_fallbacks_total`
counts the requests decided without Redis, and the change is logged; Redis is tried again after a
second."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.metrics import Metrics
from gateway.ratelimit import Headroom, Limited, RateLimiter, Reservation
from gateway.streams import StreamSlots
from gateway.tenants import Tenant

log = logging.getLogger(__name__)
KINDS = ("requests", "tokens")
RETRY_S = 1.0  # after a failure, how long requests are decided without trying Redis

# KEYS: zset, hash, total for requests, then for tokens. ARGV: window (ms), reservation id, then
# (limit, need) for requests and for tokens; a limit of -1 means none. Returns {admitted, refused
# kind index, wait ms, remaining and reset ms for requests, then for tokens}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local totals, limits, needs = {}, {}, {}
for i = 0, 1 do
  local z, h, tk = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  limits[i] = tonumber(ARGV[3 + 2 * i])
  needs[i] = tonumber(ARGV[4 + 2 * i])
  if limits[i] >= 0 then
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - window, 'LIMIT', 0, 5000)
    while #old > 0 do
      local gone = 0
      for _, a in ipairs(redis.call('HMGET', h, unpack(old))) do gone = gone + (tonumber(a) or 0) end
      redis.call('HDEL', h, unpack(old))
      redis.call('ZREM', z, unpack(old))
      redis.call('DECRBY', tk, gone)
      old = redis.call('ZRANGEBYSCORE', z, '-inf', now - window, 'LIMIT', 0, 5000)
    end
    if redis.call('ZCARD', z) == 0 then redis.call('SET', tk, 0) end
    totals[i] = tonumber(redis.call('GET', tk) or '0')
  end
end
local refused, wait = -1, 0
for i = 0, 1 do
  if refused < 0 and limits[i] >= 0 and totals[i] + needs[i] > limits[i] then
    refused, wait = i, window
    local excess = totals[i] + needs[i] - limits[i]
    local z, h = KEYS[3 * i + 1], KEYS[3 * i + 2]
    local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
    for j = 1, #entries, 2 do
      excess = excess - (tonumber(redis.call('HGET', h, entries[j])) or 0)
      if excess <= 0 then wait = tonumber(entries[j + 1]) + window - now; break end
    end
  end
end
if refused < 0 then
  for i = 0, 1 do
    if limits[i] >= 0 then
      local z, h, tk = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
      redis.call('ZADD', z, now, ARGV[2])
      redis.call('HSET', h, ARGV[2], needs[i])
      totals[i] = redis.call('INCRBY', tk, needs[i])
      for _, k in ipairs({z, h, tk}) do redis.call('PEXPIRE', k, 2 * window) end
    end
  end
end
local out = {refused < 0 and 1 or 0, refused, wait}
for i = 0, 1 do
  local reset = 0
  if limits[i] >= 0 then
    local newest = redis.call('ZRANGE', KEYS[3 * i + 1], -1, -1, 'WITHSCORES')
    if #newest > 0 then reset = tonumber(newest[2]) + window - now end
    table.insert(out, math.max(0, limits[i] - totals[i]))
  else
    table.insert(out, -1)
  end
  table.insert(out, math.max(0, reset))
end
return out
"""

# KEYS: the tokens zset, hash and total. ARGV: reservation id, real count. A reservation that has
# already left the window is not counted any more and is left alone.
SETTLE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
end
return 0
"""


# Stream slots. KEYS: the tenant's slots (ids by expiry). ARGV: slot id, limit, ttl (ms).
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""

# KEYS: one tenant's slots. ARGV: ttl (ms), then the ids this replica holds open: their expiry moves on.
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 0
"""
SLOT_TTL_S = 30.0  # a slot a dead replica held is free again after this; live replicas renew every third


def keys(tenant: str, kind: str) -> list[str]:
    """`{tenant}` is a Redis Cluster hash tag: a tenant's keys live on one shard, as the script needs."""
    return [f"salora:limits:{{{tenant}}}:{kind}:{part}" for part in ("log", "amounts", "total")]


class SharedLimiter:
    def __init__(self, url: str, window_s: float, metrics: Metrics, down: str = "closed", replicas: int = 1,
                 timeout_s: float = 0.5, slot_ttl_s: float = SLOT_TTL_S) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._admit = self._redis.register_script(ADMIT)
        self._settle = self._redis.register_script(SETTLE)
        self._window_ms = max(1, round(window_s * 1000))
        self._metrics, self._down, self._replicas = metrics, down, replicas
        self._fallback = RateLimiter(window_s)
        self._retry_at = 0.0  # while in the future, Redis is not tried
        self._up: bool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acquire = self._redis.register_script(ACQUIRE)
        self._renew = self._redis.register_script(RENEW)
        self._local_slots = StreamSlots()
        self._held: dict[str, set[str]] = {}  # tenant -> ids of the slots this replica holds in Redis
        self._renewing: asyncio.Task[None] | None = None
        self._slot_ttl_ms = round(slot_ttl_s * 1000)

    async def acquire(self, tenant: str, limit: int) -> Callable[[], None] | None:
        """A stream slot of `tenant` counted across every replica (gateway/streams.py has the
        contract): a slot id in a sorted set by expiry, renewed while the stream lasts, so the slots
        of a replica that died free themselves."""
        if time.monotonic() >= self._retry_at:
            sid = secrets.token_hex(8)
            key = stream_key(tenant)
            try:
                granted = await self._acquire(keys=[key], args=[sid, limit, self._slot_ttl_ms])
            except (RedisError, OSError) as e:
                self._state(False, e)
            else:
                self._state(True)
                if not granted:
                    return None
                self._held.setdefault(tenant, set()).add(sid)
                if self._renewing is None:
                    self._renewing = asyncio.get_running_loop().create_task(self._keep_slots())
                return self._releaser(tenant, sid)
        # Without Redis, each replica caps the streams it holds itself (a cap that protects its own
        # engine rows either way): `share` gives it 1/replicas of the cap, `closed` the whole cap.
        self._metrics.limit_fallbacks.labels(self._down).inc()
        share = self._replicas if self._down == "share" else 1
        return self._local_slots.acquire_now(tenant, max(1, limit // share))

    def _releaser(self, tenant: str, sid: str) -> Callable[[], None]:
        def release() -> None:
            held = self._held.get(tenant)
            if held is None or sid not in held:
                return  # idempotent
            held.discard(sid)
            if not held:
                del self._held[tenant]
            self._spawn(self._redis.zrem(stream_key(tenant), sid))

        return release

    async def _keep_slots(self) -> None:
        while True:
            await asyncio.sleep(self._slot_ttl_ms / 3000)
            for tenant, held in list(self._held.items()):
                try:
                    await self._renew(keys=[stream_key(tenant)], args=[self._slot_ttl_ms, *held])
                except (RedisError, OSError) as e:
                    log.warning("cannot renew the stream slots of %s in Redis: %s", tenant, e)

    async def admit(self, tenant: Tenant, tokens: int = 0) -> Reservation | Limited:
        if tenant.rpm is None and tenant.tpm is None:
            return Reservation()
        if time.monotonic() >= self._retry_at:
            rid = secrets.token_hex(8)
            args = [self._window_ms, rid, _arg(tenant.rpm), 1, _arg(tenant.tpm), tokens]
            try:
                got = await self._admit(keys=[*keys(tenant.name, "requests"), *keys(tenant.name, "tokens")], args=args)
            except (RedisError, OSError) as e:
                self._state(False, e)
            else:
                self._state(True)
                return self._decision(tenant, tokens, rid, [int(x) for x in got])
        return self._without_redis(tenant, tokens)

    def _decision(self, tenant: Tenant, tokens: int, rid: str, got: list[int]) -> Reservation | Limited:
        admitted, refused, wait_ms = got[0], got[1], got[2]
        limits = (tenant.rpm, tenant.tpm)
        headroom = tuple(Headroom(kind, limit, got[3 + 2 * i], got[4 + 2 * i] / 1000)
                         for i, (kind, limit) in enumerate(zip(KINDS, limits)) if limit is not None)
        if not admitted:
            kind, limit, need = KINDS[refused], limits[refused], (1, tokens)[refused]
            assert limit is not None
            if need > limit:
                return Limited(kind, math.ceil(self._window_ms / 1000), limit, need, too_large=True)
            return Limited(kind, max(1, math.ceil(wait_ms / 1000)), limit, need, headroom=headroom)
        if tenant.tpm is None:
            return Reservation(headroom)
        token_keys = keys(tenant.name, "tokens")
        return Reservation(headroom, lambda n: self._spawn(self._settle(keys=token_keys, args=[rid, n])))

    def _without_redis(self, tenant: Tenant, tokens: int) -> Reservation | Limited:
        self._metrics.limit_fallbacks.labels(self._down).inc()
        if self._down == "share":
            return self._fallback.admit_now(tenant, tokens, share=self._replicas)
        return Limited("requests", 1, tenant.rpm or 0, unavailable=True)

    def _state(self, up: bool, error: Exception | None = None) -> None:
        if not up:
            self._retry_at = time.monotonic() + RETRY_S
        if up == self._up:
            return
        self._up = up
        self._metrics.shared_limits_up.set(1 if up else 0)
        if up:
            log.info("the shared rate limits (Redis) answer again")
        else:
            log.error("the shared rate limits (Redis) do not answer (%s); limits.redis_down=%s applies", error,
                      self._down)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            try:
                await work
            except (RedisError, OSError) as e:  # the reservation stands: the tenant is charged the estimate
                log.warning("cannot settle a reservation in Redis: %s", e)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def healthy(self) -> bool:
        """Whether Redis answers now (readiness asks, so a replica cut off from it is taken out of
        the load balancer when `limits.redis_down` is `closed`)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as e:
            self._state(False, e)
            return self._down == "share"
        self._state(True)
        self._retry_at = 0.0
        return True

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()


def stream_key(tenant: str) -> str:
    return f"salora:streams:{{{tenant}}}"


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit
