"""Probes and metrics for the orchestrator and Prometheus. The probes need no credential and so name
no tenant and no adapter; `/metrics` does name them, so when the gateway has an admin key it needs a
bearer token: `metrics_key` (what Prometheus is given) or the admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from gateway.auth import require_metrics_reader
from gateway.context import Context, context

router = APIRouter()


class Readiness(BaseModel):
    status: str  # ready | loading | failed | degraded (a replica cut off from its database or Redis)
    model: str | None = None
    error: str | None = None


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it may still be loading the model)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(ctx: Context = Depends(context)) -> JSONResponse:
    """200 once the engine can generate and the live adapters are restored; 503 while it loads or
    after it failed."""
    engine = ctx.engine
    if not (engine.ready and ctx.lifecycle.ready):
        status = "failed" if engine.error else "loading"
        return JSONResponse({"status": status, "error": engine.error}, status_code=503)
    if ctx.feed is not None and not ctx.feed.connected.is_set():
        return JSONResponse({"status": "degraded", "error": "not listening for the other replicas' changes "
                             "(the database does not answer)"}, status_code=503)
    if not await ctx.limiter.healthy():
        return JSONResponse({"status": "degraded", "error": "the shared rate limits (Redis) do not answer"},
                            status_code=503)
    return JSONResponse({"status": "ready", "model": engine.model_id})


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_metrics_reader)])
async def metrics(ctx: Context = Depends(context)) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
