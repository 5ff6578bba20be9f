"""Bearer-key authentication: tenants by their API key, the admin by the separate admin key."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from gateway.context import Context, context
from gateway.errors import APIError, invalid_api_key
from gateway.tenants import ANONYMOUS, Tenant, hash_key


def bearer(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header's value (None: no bearer key)."""
    scheme, _, key = authorization.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def bearer_key(request: Request) -> str | None:
    return bearer(request.headers.get("authorization", ""))


def authenticate(ctx: Context, request: Request) -> Tenant:
    """The calling tenant; 401 unless the key belongs to one (any caller when running open)."""
    return authenticate_bearer(ctx, request.headers.get("authorization", ""))


def authenticate_bearer(ctx: Context, authorization: str) -> Tenant:
    """`authenticate` from the `Authorization` header's value (the chat path reads its headers itself)."""
    if ctx.anonymous:
        return ANONYMOUS
    key = bearer(authorization)
    tenant = ctx.tenants.authenticate(key) if key else None
    if tenant is None:
        raise invalid_api_key()
    return tenant


async def require_tenant(request: Request, ctx: Context = Depends(context)) -> Tenant:
    return authenticate(ctx, request)


async def require_admin(request: Request, ctx: Context = Depends(context)) -> None:
    if ctx.admin_key_sha256 is None:
        raise APIError(401, "The admin API is off: set SALORA_ADMIN_KEY to enable it.", code="admin_disabled")
    key = bearer_key(request)
    if key is None or not hmac.compare_digest(hash_key(key), ctx.admin_key_sha256):
        raise invalid_api_key()


async def require_metrics_reader(request: Request, ctx: Context = Depends(context)) -> None:
    """`/metrics` names tenants and adapters: with an admin key set it takes `metrics_key` (what
    Prometheus is given) or the admin key. Open when the gateway has no admin key (nothing is)."""
    allowed = [h for h in (ctx.metrics_key_sha256, ctx.admin_key_sha256) if h]
    if not allowed:
        return
    key = bearer_key(request)
    digest = hash_key(key) if key else ""
    if not any(hmac.compare_digest(digest, h) for h in allowed):
        raise invalid_api_key()
