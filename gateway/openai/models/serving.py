"""What a tenant may call, as the catalog says (gateway/catalog.py)."""

from __future__ import annotations

from gateway.context import Context
from gateway.openai.models.protocol import ModelCard, ModelList
from gateway.tenants import Tenant


def visible_models(ctx: Context, tenant: Tenant) -> ModelList:
    return ModelList(data=[ModelCard(id=name, created=ctx.started_at, owned_by="salora")
                           for name in ctx.catalog.visible(tenant)])
