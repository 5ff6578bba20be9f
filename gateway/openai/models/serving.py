"""What a tenant may call: the base model and the loaded adapters it is allowed."""

from __future__ import annotations

from gateway.context import Context
from gateway.openai.models.protocol import ModelCard, ModelList
from gateway.tenants import Tenant


def visible_models(ctx: Context, tenant: Tenant) -> ModelList:
    engine, created = ctx.engine, ctx.started_at
    cards = [ModelCard(id=engine.model_id, created=created, owned_by="salora")]
    cards += [ModelCard(id=name, created=created, owned_by="salora")
              for name in sorted(ctx.served_adapters()) if tenant.may_use(name)]
    return ModelList(data=cards)
