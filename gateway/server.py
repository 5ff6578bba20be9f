"""Run the gateway with uvicorn (what `salora serve` calls)."""

from __future__ import annotations

import logging

import uvicorn

from gateway.app import create_app
from gateway.settings import Settings


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    # No access log: a line per request was a third of the HTTP layer's CPU per request
    # (docs/performance.md), and salora_requests_total already counts every request.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)
