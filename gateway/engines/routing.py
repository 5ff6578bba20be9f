"""Engines named in the settings, and the routes that send a model name to one of them.

`local` is the in-process engine (top-level `model`), `vllm` the `vllm:` section, and `engines:` holds
more vLLM deployments by name. The default engine (`engine:`) serves the base model and every adapter.
A route serves a model name whole by another engine's model, e.g. a dedicated vLLM deployment of a
merged SaLoRA model for a tenant that wants no adapter overhead. To the HTTP layer a routed name looks
like one more adapter, so tenant grants, limits, metrics and refusal accounting apply unchanged.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

from gateway.engines.base import Chunk, Engine, EngineError, GenerationRequest
from gateway.engines.vllm import VLLMEngine
from gateway.settings import Settings

log = logging.getLogger(__name__)


class RoutedEngine:
    """The default engine, plus model names each served by another engine's base model."""

    def __init__(self, default: Engine, routes: dict[str, Engine]) -> None:
        self._default = default
        self._routes = routes
        self._route_names = frozenset(routes)
        self._others = list({id(e): e for e in routes.values() if e is not default}.values())
        self._starting: list[asyncio.Task[None]] = []
        self.name = default.name
        self.model_id = default.model_id

    @property
    def error(self) -> str | None:
        return self._default.error

    @property
    def ready(self) -> bool:
        return self._default.ready

    def adapters(self) -> frozenset[str]:
        return self._default.adapters() | self._route_names

    async def start(self) -> None:
        """Start the default engine; the others start beside it, so a slow or failed deployment
        behind one route never holds up the rest (its requests get a 503 until it is up)."""
        self._starting = [asyncio.create_task(self._start_other(e)) for e in self._others]
        await self._default.start()

    @staticmethod
    async def _start_other(engine: Engine) -> None:
        try:
            await engine.start()
        except EngineError as e:
            log.error("the %s engine did not start: %s", engine.name, e)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        engine = self._routes.get(request.adapter) if request.adapter is not None else None
        if engine is None or engine is self._default:
            return self._default.generate(request if engine is None else replace(request, adapter=None))
        return _named(engine.name, engine.generate(replace(request, adapter=None)))

    async def load_adapter(self, name: str, path: Path) -> None:
        if name in self._routes:
            raise ValueError(f"{name!r} is a routed model name, not an adapter")
        await self._default.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._default.unload_adapter(name)

    async def close(self) -> None:
        for task in self._starting:
            task.cancel()
        for engine in (self._default, *self._others):
            await engine.close()


async def _named(name: str, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """`stream`, its EngineError naming the engine that failed (the metric's label), closed with it."""
    async with aclosing(stream):
        try:
            async for chunk in stream:
                yield chunk
        except EngineError as e:
            e.engine = e.engine or name
            raise


LOCAL_EXTRA = ("torch", "transformers", "peft")  # what the in-process engine needs beyond the plain install


def missing_local_extra(settings: Settings) -> str | None:
    """Why the configured engines cannot start in this install (None: they can): the in-process
    engine needs the `local` extra, which the plain (vLLM-mode) install leaves out."""
    if "local" not in {settings.engine, *settings.routes.values()}:
        return None
    missing = [name for name in LOCAL_EXTRA if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the in-process engine (engine: local) needs {', '.join(missing)}: pip install 'salora-gateway[local]', "
            "or serve through vLLM (engine: vllm, docs/vllm.md)")


def engine_from_settings(settings: Settings, on_batch: Callable[[int], None], on_error: Callable[[str, str], None]) -> Engine:
    """The engine the gateway serves through. `on_batch` observes the local engine's decode batch
    sizes; `on_error(engine, kind)` counts the vLLM engines' replica failures and retries."""
    built: dict[str, Engine] = {}

    def engine(name: str, default: bool) -> Engine:
        if name in built:
            return built[name]
        adapters = settings.adapters if default else {}
        if name == "local":
            from gateway.engines.local import LocalEngine  # torch and transformers: the `local` extra only

            built[name] = LocalEngine(settings.model, settings.served_model_id, adapters,
                                      max_batch_size=settings.max_batch_size, max_model_len=settings.max_model_len,
                                      on_batch=on_batch, timeouts=settings.timeouts)
        else:
            config = settings.vllm if name == "vllm" else settings.engines[name]
            assert config is not None
            built[name] = VLLMEngine(name, config, settings.served_model_id, adapters, probe_model=settings.model,
                                     on_error=lambda kind: on_error(name, kind), timeouts=settings.timeouts)
        return built[name]

    default = engine(settings.engine, default=True)
    if not settings.routes:
        return default
    return RoutedEngine(default, {model: engine(name, default=False) for model, name in settings.routes.items()})
