"""Graceful shutdown: on SIGTERM the gateway stops taking work but finishes what it has.

- At once, `/readyz` answers 503 (`draining`), so the orchestrator stops sending traffic, and every
  new request but `/healthz` and `/metrics` gets a 503 in OpenAI's error shape with `Connection:
  close`: the listener stays open, so a client that still reaches this instance is told to go
  elsewhere instead of being refused a connection.
- Requests in flight, streams included, run on for up to `shutdown_timeout_s`.
- Whatever still runs then is cut: a stream gets an `error` event and ends, a request that has not
  answered yet gets a 503. Only then does uvicorn close the listener and the app shut down.

`Drain` wraps the whole ASGI app (in `gateway.server`), so it sees every request however it is routed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError

log = logging.getLogger(__name__)
ALWAYS = frozenset({"/healthz", "/metrics"})  # still answered while draining
CUT_GRACE_S = 2.0  # how long cut requests get to send their error


def _error(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="shutting_down", headers={"Connection": "close"})


@dataclass(eq=False)
class _Flight:
    """One request in flight: what of its response has gone out, so a cut can end it properly."""

    send: Send
    started: bool = False  # the status line and headers are out
    headers: Iterable[tuple[bytes, bytes]] = ()  # theirs, read only if the response is cut
    finished: bool = False
    cut: bool = False  # cancelled by the drain deadline

    @property
    def events(self) -> bool:
        """The response is a server-sent event stream (looked up only when it is cut, not per request)."""
        return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in self.headers)

    async def forward(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.headers = message.get("headers", ())
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self.send(message)

    async def end(self, scope: Scope, receive: Receive) -> None:
        """Finish a response the deadline cut short."""
        if self.finished:
            return
        message = "The gateway shut down before this request finished; retry it."
        if not self.started:
            await _error(message).response()(scope, receive, self.send)
            return
        body = b"data: " + json.dumps(_error(message).body()).encode() + b"\n\n" if self.events else b""
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class Drain:
    """An ASGI middleware that tracks requests in flight, and the wait for them at shutdown."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.draining = False
        self._flights: dict[asyncio.Task[object], _Flight] = {}

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining and scope["path"] not in ALWAYS:
            if scope["path"] == "/readyz":
                body = json.dumps({"status": "draining"}).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
            else:
                await _error("The gateway is shutting down; retry on another instance.").response()(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        flight = _Flight(send)
        self._flights[task] = flight
        try:
            await self.app(scope, receive, flight.forward)
        except asyncio.CancelledError:
            if not flight.cut:
                raise
            task.uncancel()
            await flight.end(scope, receive)
        finally:
            del self._flights[task]

    def begin(self) -> None:
        """Start draining. Only sets a flag, so a signal handler may call it."""
        self.draining = True

    async def wait(self) -> None:
        """Wait up to `timeout_s` for the requests in flight, then cut the ones left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        log.info("draining: %d requests in flight, up to %g s (shutdown_timeout_s)", self.in_flight, self.timeout_s)
        while self._flights and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self._flights:
            log.info("drained")
            return
        log.warning("cutting %d requests still running after shutdown_timeout_s", self.in_flight)
        for task, flight in list(self._flights.items()):
            flight.cut = True
            task.cancel()
        deadline = loop.time() + CUT_GRACE_S
        while self._flights and loop.time() < deadline:
            await asyncio.sleep(0.02)
