"""Run the gateway with uvicorn (what `salora serve` calls), draining on SIGTERM (gateway/shutdown.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from gateway.app import create_app
from gateway.header_limit import bounded_protocol
from gateway.settings import Settings
from gateway.shutdown import Drain

STARTUP_FAILURE = 3  # uvicorn's exit code when the app does not start
CONNECTIONS_GRACE_S = 5  # after the drain: how long uvicorn waits for connections to close


class GatewayServer(uvicorn.Server):
    """uvicorn whose first SIGTERM or SIGINT drains the gateway before uvicorn's own shutdown; a
    second signal stops it at once (uvicorn's default)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:
            super().handle_exit(sig, frame)
        else:
            self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and self._draining is None:
            self._draining = asyncio.create_task(self.drain.wait())
        if self._draining is not None and self._draining.done():
            return True
        return await super().on_tick(counter)


def uvicorn_config(app: ASGIApp, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """uvicorn for the gateway: the httptools parser with the header cap (gateway/header_limit.py)."""
    return uvicorn.Config(app, http=bounded_protocol(settings.limits.max_header_bytes), **kwargs)


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    drain = Drain(create_app(settings), settings.shutdown_timeout_s)
    # No access log: a line per request was a third of the HTTP layer's CPU per request
    # (docs/performance.md), and salora_requests_total already counts every request.
    config = uvicorn_config(drain, settings, host=settings.host, port=settings.port, log_level="info",
                            access_log=False, timeout_graceful_shutdown=CONNECTIONS_GRACE_S)
    server = GatewayServer(config, drain)
    # Everything imported so far (torch and transformers for the vLLM engine's probe adapter: about
    # 240,000 objects) lives as long as the process. Frozen, the collector no longer walks it: a full
    # collection over it paused the event loop for 0.2-0.6 s (docs/performance.md).
    gc.collect()
    gc.freeze()
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
