from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.auth import require_tenant
from gateway.context import Context, context
from gateway.errors import documented, model_not_found
from gateway.openai.models.protocol import ModelCard, ModelList
from gateway.openai.models.serving import visible_models
from gateway.tenants import Tenant

router = APIRouter()


@router.get("/v1/models")
async def list_models(tenant: Tenant = Depends(require_tenant), ctx: Context = Depends(context)) -> ModelList:
    return visible_models(ctx, tenant)


@router.get("/v1/models/{model:path}", responses=documented(404))
async def retrieve_model(model: str, tenant: Tenant = Depends(require_tenant), ctx: Context = Depends(context)) -> ModelCard:
    card = next((c for c in visible_models(ctx, tenant).data if c.id == model), None)
    if card is None:
        raise model_not_found(model)
    return card
