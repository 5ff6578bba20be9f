"""Adapter administration (admin key): upload, list, inspect, probe again, force live, retire."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool

from gateway.admin.adapters.protocol import AdapterDetail, AdapterInfo, AdapterList, ForceLive, Retire
from gateway.admin.adapters.serving import AdapterAdmin
from gateway.auth import require_admin
from gateway.context import Context, context
from gateway.errors import documented

UPLOAD_PATH = "/admin/adapters"  # its body has its own cap, lifecycle.max_upload_bytes
router = APIRouter(prefix=UPLOAD_PATH, dependencies=[Depends(require_admin)])


UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "file"],
    "properties": {
        "name": {"type": "string", "description": "the adapter's name, ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"},
        "tenants": {"type": "string", "description": "tenant names, comma-separated (or the field repeated)"},
        "actor": {"type": "string", "description": "who uploads, for the audit log"},
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one archive (.tar.gz, .tgz, .tar, .zip), or the adapter's files"},
    },
}}}}


@router.post("", status_code=202, responses=documented(400, 409, 413, 422, 503, 507), openapi_extra={"requestBody": UPLOAD_BODY})
async def upload_adapter(request: Request, ctx: Context = Depends(context)) -> AdapterInfo:
    """Multipart: `name`, `tenants`, and `file` (a .tar.gz/.zip of a PEFT adapter or `salora train`
    checkpoint, or its files). 202 once it passed validation and its canary started; 4xx otherwise,
    leaving nothing behind."""
    return await AdapterAdmin(ctx).upload(request)


@router.get("")
async def list_adapters(ctx: Context = Depends(context)) -> AdapterList:
    return AdapterList(data=await run_in_threadpool(AdapterAdmin(ctx).all))


@router.get("/{name}", responses=documented(404))
async def get_adapter(name: str, ctx: Context = Depends(context)) -> AdapterDetail:
    """The adapter's record, its latest canary report in full, every run, and its audit log."""
    return await run_in_threadpool(AdapterAdmin(ctx).detail, name)


@router.post("/{name}/probe", status_code=202, responses=documented(404, 409, 503))
async def probe_adapter(name: str, ctx: Context = Depends(context)) -> AdapterInfo:
    """Run the canary again (a live adapter that fails is flagged; a rejected one that passes goes live)."""
    return await AdapterAdmin(ctx).act("probe", name)


@router.post("/{name}/force", responses=documented(404, 409, 503))
async def force_live(name: str, body: ForceLive, ctx: Context = Depends(context)) -> AdapterInfo:
    """Put a rejected adapter live despite its canary; `actor` and `reason` go to the audit log."""
    return await AdapterAdmin(ctx).act("force", name, body.actor, body.reason)


@router.delete("/{name}", responses=documented(404, 409, 503))
async def retire_adapter(name: str, body: Retire | None = Body(default=None), ctx: Context = Depends(context)) -> AdapterInfo:
    """Take an adapter out of service in any active state, its record kept: a live one is retired, a
    probing one too (its canary cancelled), an upload a failure left behind is rejected."""
    body = body or Retire()
    return await AdapterAdmin(ctx).act("retire", name, body.actor, body.reason)
