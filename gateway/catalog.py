"""The serving catalog: the one owner of "which models may this caller reach now". A model is
routable when it is the base, or an adapter that is live in the registry, loaded in the engine and
not held back by the lifecycle (a candidate under its canary, an adapter being retired), or a routed
model; and the tenant is granted it. The chat and completion routes, the models list, the metric
series and the admin API ask only this."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.adapters.lifecycle import Lifecycle
from gateway.engines.base import Engine
from gateway.tenants import Tenant


class Catalog:
    def __init__(self, engine: Engine, lifecycle: Lifecycle, routes: Iterable[str]) -> None:
        self._engine, self._lifecycle, self._routes = engine, lifecycle, frozenset(routes)

    @property
    def base(self) -> str:
        return self._engine.model_id

    def served(self) -> frozenset[str]:
        """Adapters and routed models a request may reach, whoever sends it."""
        lifecycle = self._lifecycle
        return (self._engine.adapters() - lifecycle.held_back) & (lifecycle.live | self._routes)

    def resolve(self, tenant: Tenant, model: str) -> str | None:
        """The adapter `tenant` reaches by naming `model` (None: the base). KeyError when it may not."""
        if model == self.base:
            return None
        if model in self.served() and tenant.may_use(model):
            return model
        raise KeyError(model)

    def visible(self, tenant: Tenant) -> list[str]:
        """Every model `tenant` may call, the base first."""
        return [self.base, *sorted(m for m in self.served() if tenant.may_use(m))]

    def serving(self, name: str) -> bool:
        return name in self.served()
