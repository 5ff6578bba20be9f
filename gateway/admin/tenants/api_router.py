"""Tenant administration. Handlers are plain functions (FastAPI runs them in a thread pool) because
they write to the database."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.auth import require_admin
from gateway.context import Context, context
from gateway.errors import APIError, documented
from gateway.admin.tenants.protocol import TenantCreate, TenantDeleted, TenantInfo, TenantList, TenantWithKey
from gateway.tenants import TenantExists, UnknownTenant

router = APIRouter(prefix="/admin/tenants", dependencies=[Depends(require_admin)])


def _unknown(name: str) -> APIError:
    return APIError(404, f"No tenant named {name!r}.", param="name", code="tenant_not_found")


@router.post("", status_code=201, responses=documented(409))
def create_tenant(body: TenantCreate, ctx: Context = Depends(context)) -> TenantWithKey:
    try:
        tenant, key = ctx.tenants.create(body.name, body.adapters, body.rpm, body.tpm)
    except TenantExists:
        raise APIError(409, f"A tenant named {body.name!r} exists.", param="name", code="tenant_exists") from None
    ctx.create_known_series()
    return TenantWithKey(**TenantInfo.of(tenant).model_dump(), key=key)


@router.get("")
def list_tenants(ctx: Context = Depends(context)) -> TenantList:
    return TenantList(data=[TenantInfo.of(t) for t in ctx.tenants.all()])


@router.delete("/{name}", responses=documented(404))
def delete_tenant(name: str, ctx: Context = Depends(context)) -> TenantDeleted:
    try:
        ctx.tenants.delete(name)
    except UnknownTenant:
        raise _unknown(name) from None
    return TenantDeleted(name=name)


@router.post("/{name}/rotate", responses=documented(404))
def rotate_key(name: str, ctx: Context = Depends(context)) -> TenantWithKey:
    """A new key for the tenant; the old one stops working at once."""
    try:
        key = ctx.tenants.rotate(name)
    except UnknownTenant:
        raise _unknown(name) from None
    tenant = ctx.tenants.get(name)
    assert tenant is not None
    return TenantWithKey(**TenantInfo.of(tenant).model_dump(), key=key)
