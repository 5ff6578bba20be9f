"""A lean pooled HTTP/1.1 client for one thing: POST a JSON body, read the whole answer. The vLLM
engine's non-streamed chat requests use it (streams stay on aiohttp).

Why not aiohttp here: sequential requests to the fake upstream cost 440-590 µs of client CPU each
with aiohttp and 100-150 µs with an asyncio protocol on the httptools parser (a loaded 2-core
machine, docs/performance.md); at 500 requests/s that is a fifth of the gateway's CPU. Its errors are
aiohttp's exception types, so the engine's retry and failover code treats both clients alike:
`ConnectionTimeoutError` (no connection within `connect_timeout_s`), `SocketTimeoutError` (no byte
within `read_timeout_s`, or the request's deadline passed), `ClientConnectorError` (refused,
unreachable), `ServerDisconnectedError` and `ClientPayloadError` (a broken answer)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import SplitResult, urlsplit

import aiohttp
import httptools


class ConnectFailed(aiohttp.ClientConnectorError):
    """The replica refused the connection or cannot be reached (aiohttp's type, without its key)."""

    def __init__(self, where: str, error: OSError) -> None:
        OSError.__init__(self, error.errno, f"cannot connect to {where}: {error.strerror or error}")

    def __str__(self) -> str:
        return str(self.args[1])


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self, read_timeout_s: float) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # its clock: deadlines are the engine's, in loop time
        self.closed = False
        self.idle_since = 0.0
        self._done: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._last = 0.0  # loop time of the last byte received
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._last = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(aiohttp.ClientPayloadError(f"malformed answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(aiohttp.ServerDisconnectedError())

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()
        self._settle()
        if self._done is not None and not self._done.done():
            self._done.set_result((self.parser.get_status_code(), b"".join(self._body)))

    # one request
    async def exchange(self, head: bytes, body: bytes, deadline: float) -> tuple[int, bytes]:
        """Send one request, wait for its whole answer: no byte for `read_timeout_s`, or `deadline`
        (loop time) passed, ends it with a SocketTimeoutError."""
        assert self.transport is not None
        self._done, self._body = self.loop.create_future(), []
        self._last, self._deadline = self.loop.time(), deadline
        self._arm()
        self.transport.write(head + body)
        return await self._done

    def _arm(self) -> None:
        self._timer = self.loop.call_at(min(self._last + self.read_timeout_s, self._deadline), self._check_timeout)

    def _check_timeout(self) -> None:
        """The one timer of a request, re-armed only when it fires (bytes arriving do not touch it)."""
        self._timer = None
        now = self.loop.time()
        if now >= self._deadline or now - self._last >= self.read_timeout_s:
            self.close()
            self._fail(aiohttp.SocketTimeoutError())
        else:
            self._arm()

    def _settle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: Exception) -> None:
        self._settle()
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class PostPool:
    """Keep-alive connections to any number of `http(s)://host:port` origins, at most `limit` in use
    at once; an idle one is not used again after `keepalive_s` (before the server's own keep-alive
    closes it under a request) and is closed when the next connection is opened."""

    def __init__(self, *, limit: int, keepalive_s: float, connect_timeout_s: float, read_timeout_s: float,
                 headers: dict[str, str] | None = None) -> None:
        self.limit, self.keepalive_s = limit, keepalive_s
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._idle: dict[str, deque[_Connection]] = {}
        self._targets: dict[str, tuple[str, SplitResult, bytes]] = {}  # URL -> _target(URL); config URLs only
        self._slots: asyncio.Semaphore | None = None  # made on first use, on the running loop
        self.opened = 0

    async def post(self, url: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        """POST `body` (JSON) to `url`; the status and the whole answer, within `timeout_s` in all."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = self._target(url)
        origin, parts, head = target
        head += b"content-length: %d\r\n\r\n" % len(body)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            connection = self._reuse(origin) or await self._open(parts, deadline)
            try:
                answer = await connection.exchange(head, body, deadline)
            except BaseException:
                connection.close()  # a half-read answer (or a cancel) leaves the connection unusable
                raise
            if not connection.closed:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(origin, deque()).append(connection)
            return answer

    def _target(self, url: str) -> tuple[str, SplitResult, bytes]:
        """(origin, parts, request head up to its content-length) of a URL: the same few URLs (a
        replica's chat paths) are posted to on every request, so they are parsed once each."""
        parts = urlsplit(url)
        head = (f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
                f"host: {parts.netloc}\r\n{self._extra}content-type: application/json\r\n").encode("latin-1")
        return f"{parts.scheme}://{parts.netloc}", parts, head

    def _reuse(self, origin: str) -> _Connection | None:
        idle, now = self._idle.get(origin), time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closing
            if not connection.closed and now - connection.idle_since < self.keepalive_s:
                return connection
            connection.close()
        return None

    async def _open(self, parts: SplitResult, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        host, secure = parts.hostname or "", parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        timeout = min(self.connect_timeout_s, max(0.0, deadline - loop.time()))
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self.read_timeout_s), host, port,
                    ssl=ssl.create_default_context() if secure else None)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError() from None
        except OSError as e:
            raise ConnectFailed(f"{host}:{port}", e) from None
        self.opened += 1
        self._drop_expired()
        return connection

    def _drop_expired(self) -> None:
        """Close idle connections past their keep-alive (checked when a connection is opened, so
        there is no timer per connection)."""
        now = time.monotonic()
        for idle in self._idle.values():
            while idle and (idle[0].closed or now - idle[0].idle_since >= self.keepalive_s):
                idle.popleft().close()

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
