"""A minimal HTTP/1.1 keep-alive client for load generation (asyncio protocol + httptools parser).

Why not httpx or aiohttp: the generator shares two cores with the servers it measures, and a
general-purpose client spends several times more CPU per request than parsing with httptools
directly. Less client CPU means less noise in the latencies. It does only what a load test needs:
one prebuilt request, the status, and the times of the first token and of the last byte."""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from dataclasses import dataclass

import httptools

# The first non-empty content delta of a chat stream (compact or spaced JSON).
_CONTENT = re.compile(rb'"content":\s*"[^"]')


@dataclass(slots=True)
class Outcome:
    """One request: `error` is None on a 2xx with a complete body, else a short reason."""

    sent: float
    done: float
    first_token: float | None
    error: str | None


class ResponseError(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection that carries one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.status = 0
        self.first_token: float | None = None
        self.scan = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(ResponseError(f"bad response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(ResponseError("connection closed"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.scan and _CONTENT.search(body):
            self.first_token, self.scan = time.perf_counter(), False

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()
        self._finish(None)

    def _finish(self, error: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            if error is None:
                self.waiter.set_result(None)
            else:
                self.waiter.set_exception(error)

    async def exchange(self, request: bytes, stream: bool) -> None:
        assert self.transport is not None
        self.status, self.first_token, self.scan = 0, None, stream
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        await self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one host; a request takes an idle one or opens a new one, so an
    open-loop generator never waits for the server to free a connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[_Connection] = deque()
        self.opened = 0

    async def _acquire(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        self.opened += 1
        return conn

    async def request(self, request: bytes, stream: bool, timeout: float) -> Outcome:
        """Send `request`; its latency runs from now (connection set-up included) to the last byte."""
        sent = time.perf_counter()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = await self._acquire()
                await conn.exchange(request, stream)
        except TimeoutError:
            error: str | None = "timeout"
        except (OSError, ResponseError) as e:
            error = type(e).__name__ if isinstance(e, OSError) else str(e)
        else:
            error = None if 200 <= conn.status < 300 else f"http {conn.status}"
        done = time.perf_counter()
        if conn is None:
            return Outcome(sent, done, None, error)
        if error is None and not conn.closed:
            self.idle.append(conn)
        elif error is not None:
            conn.close()  # a half-read response must not leak into the next request
        return Outcome(sent, done, conn.first_token, error)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def build_request(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    """The raw bytes of one POST, built once and sent as is for every request of a run."""
    headers = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
               f"Content-Length: {len(body)}", "Accept: */*"]
    if key:
        headers.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body
