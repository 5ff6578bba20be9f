"""`create_app(settings)`: the FastAPI application. Start-up opens the database and begins loading the
engine in the background, so `/healthz` answers at once and `/readyz` turns 200 when the model is in."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from gateway.adapters.lifecycle import Lifecycle
from gateway.adapters.registry import Registry
from gateway.admin.adapters.api_router import UPLOAD_PATH
from gateway.admin.adapters.api_router import router as adapters_router
from gateway.admin.tenants.api_router import router as tenants_router
from gateway.body_limit import BodyLimit
from gateway.catalog import Catalog
from gateway.changes import Announcer, ChangeFeed, replica_id
from gateway.context import Context
from gateway.control_tokens import ContentGuard
from gateway.db import close_db, open_db
from gateway.engines.base import Engine, EngineError
from gateway.engines.routing import engine_from_settings
from gateway.errors import install_error_handlers
from gateway.metrics import Metrics
from gateway.openai.chat_completion.api_router import ChatFrontApp
from gateway.openai.models.api_router import router as models_router
from gateway.openapi import install_openapi
from gateway.ops import router as ops_router
from gateway.ratelimit import Limiter, RateLimiter
from gateway.shared_limits import SharedLimiter
from gateway.settings import Settings
from gateway.tenants import TenantStore, hash_key
from salora.errors import SaLoRAError
from salora.judge import Judge, KeywordJudge
from salora.modeldir import resolve_model_dir

log = logging.getLogger(__name__)


def build_engine(settings: Settings, metrics: Metrics) -> Engine:
    """The configured engines (gateway/engines/routing.py), reporting into `metrics`."""
    return engine_from_settings(settings, metrics.batch_size.observe,
                                lambda engine, kind: metrics.engine_errors.labels(engine, kind).inc())


def build_limiter(settings: Settings, metrics: Metrics) -> Limiter:
    """Limits in this process, or shared by every replica through Redis when `redis_url` is set."""
    if settings.redis_url is None:
        return RateLimiter(settings.rate_window_s)
    limits = settings.limits
    return SharedLimiter(settings.redis_url.get_secret_value(), settings.rate_window_s, metrics, limits.redis_down,
                         limits.replicas)


def change_feed(ctx: Context, sessions: sessionmaker[Session]) -> ChangeFeed | None:
    """On PostgreSQL, listen for the other replicas' changes: tenants are reloaded, and the engine
    follows the registry once the adapters this replica serves are restored."""
    bind = sessions.kw["bind"]
    if bind.dialect.name != "postgresql":
        return None

    async def tenants() -> None:
        await asyncio.to_thread(ctx.tenants.reload)
        ctx.create_known_series()

    async def adapters() -> None:
        if ctx.lifecycle.ready:
            await ctx.lifecycle.sync()

    feed = ChangeFeed(bind.url.render_as_string(hide_password=False), ctx.replica,
                      {"tenants": tenants, "adapters": adapters}, on_lag=ctx.metrics.change_lag.observe,
                      on_state=lambda up: ctx.metrics.change_feed_up.set(1 if up else 0))
    feed.start()
    return feed


async def _start_engine(ctx: Context) -> None:
    engine = ctx.engine
    log.info("loading %s on the %s engine", ctx.settings.model, engine.name)
    started = time.perf_counter()
    try:
        # Before the engine can be ready: no request may reach it with its content unguarded.
        model_dir = await asyncio.to_thread(resolve_model_dir, ctx.settings.model)
        ctx.content_guard = await asyncio.to_thread(ContentGuard.for_model, model_dir)
    except (SaLoRAError, OSError) as e:
        log.error("cannot read the tokenizer of %s: %s", ctx.settings.model, e)
    try:
        await engine.start()
    except EngineError as e:
        ctx.metrics.engine_errors.labels(engine.name, e.kind).inc()
        log.error("%s", e)
        return
    await ctx.lifecycle.start()
    if ctx.feed is not None:
        await ctx.lifecycle.sync()  # what other replicas changed while this one started
    log.info("ready in %.1f s: model %s, adapters %s", time.perf_counter() - started, engine.model_id,
             sorted(ctx.catalog.served()) or "none")


def create_app(settings: Settings, judge: Judge | None = None) -> FastAPI:
    """The gateway for `settings`; `judge` classifies live answers (default: the keyword judge), and
    canary answers too unless the `canary.judge` setting names an LLM judge."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sessions = open_db(settings.database_url)
        replica = replica_id(settings.port)
        announce = Announcer(replica)
        tenants = TenantStore(sessions, announce)
        tenants.put_configured(settings.tenants)
        metrics = Metrics()
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        anonymous = admin_key is None and not tenants.all()
        if anonymous:
            log.warning("no tenants and no admin key: serving every caller without authentication")
        engine, live_judge = build_engine(settings, metrics), judge or KeywordJudge()
        lifecycle = Lifecycle(settings, engine, Registry(sessions, announce), tenants, metrics, live_judge,
                              on_change=lambda: ctx.create_known_series(), replica=replica)
        ctx = Context(settings=settings, engine=engine, tenants=tenants,
                      limiter=build_limiter(settings, metrics), metrics=metrics, judge=live_judge,
                      admin_key_sha256=hash_key(admin_key) if admin_key else None,
                      metrics_key_sha256=hash_key(settings.metrics_key.get_secret_value()) if settings.metrics_key else None,
                      anonymous=anonymous,
                      started_at=int(time.time()), lifecycle=lifecycle,
                      catalog=Catalog(engine, lifecycle, settings.routes), replica=replica)
        if isinstance(ctx.limiter, SharedLimiter):
            ctx.streams = ctx.limiter  # the same Redis counts every replica's streams
        ctx.feed = change_feed(ctx, sessions)
        app.state.context = ctx
        loading = asyncio.create_task(_start_engine(ctx))
        try:
            yield
        finally:
            loading.cancel()
            if ctx.feed is not None:
                await ctx.feed.close()
            await ctx.lifecycle.close()
            await ctx.engine.close()
            await ctx.limiter.close()
            close_db(sessions)

    # FastAPI's own OpenTelemetry hooks look up the tracer and meter providers (environment reads) on
    # every request: 8-9% of the gateway's GIL time under load (py-spy, docs/performance.md). The
    # gateway exports Prometheus metrics of its own.
    # The chat paths are answered in front of FastAPI's middleware stack (ChatFrontApp): they count
    # their own body, so the hot path skips BodyLimit and the rest (docs/performance.md).
    app = ChatFrontApp(title="SaLoRA Gateway", lifespan=lifespan,
                       telemetry={"tracing": False, "metrics": False, "logs": False})
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.limits.max_body_bytes, exempt={("POST", UPLOAD_PATH)})
    for router in (models_router, tenants_router, adapters_router, ops_router):
        app.include_router(router)
    install_openapi(app)
    return app
