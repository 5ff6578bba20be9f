"""A response's headers rendered once, as the bytes they are on the wire, by the code that made them.

Why: uvicorn checks, lower-cases and joins every header pair of every response (0.4 µs a pair in
process, two to three times that under load), and the chat answer sends nine of them (six
`x-ratelimit-*`, the request id, content type and length; docs/performance.md). Their values are
numbers the gateway formats and a request id that is a checked token, so those checks cannot fail
for them: a `PreparedHead` carries the lines, and `PreparedCycle` (the cycle of the gateway's server
protocol, gateway/header_limit.py) writes them as they are. Any other ASGI server, and every reader
in the gateway, sees the usual header pairs (`__iter__`); every other response goes through
uvicorn's own checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

LINE_END = b"\r\n"


class PreparedHead:
    """Header lines (`name: value\\r\\n` each, names in lower case) and the body length they
    declare. Make them only from constant names and values that are numbers or checked tokens."""

    __slots__ = ("lines", "content_length")

    def __init__(self, lines: bytes, content_length: int) -> None:
        self.lines, self.content_length = lines, content_length

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return pairs(self.lines)

    def plus(self, lines: bytes) -> PreparedHead:
        """This head with more lines, made from trusted parts like the first."""
        return PreparedHead(self.lines + lines, self.content_length)


def pairs(lines: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (name, value) pairs of header lines."""
    for line in lines.split(LINE_END)[:-1]:
        name, _, value = line.partition(b": ")
        yield name, value


_defaults: tuple[object, bytes] = (None, b"")  # uvicorn's default headers (date, server) and their lines


def _default_lines(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """The lines of uvicorn's default headers: the server renews their list once a second (the date),
    so they are rendered once per list, not per response."""
    global _defaults
    if _defaults[0] is not pairs:
        _defaults = (pairs, b"".join(b"%s: %s\r\n" % pair for pair in pairs))
    return _defaults[1]


class PreparedCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, which writes a `PreparedHead` without its per-header work,
    and in one write with the body that follows it: one packet to the client, not two (each write
    to a socket is a system call and a wake-up of the reader). Any other start message, and every
    start while a write waits, on a HEAD request or with an access log, is uvicorn's own path."""

    _head: bytes | None = None  # a prepared head not yet written: it goes out with the first body

    async def send(self, message: Any) -> None:
        head = message.get("headers")
        if type(head) is PreparedHead:
            if (message["type"] != "http.response.start" or self.response_started or self.disconnected
                    or self.flow.write_paused or self.access_log or self.scope["method"] == "HEAD"):
                await super().send(message)
                return
            self.response_started, self.waiting_for_100_continue = True, False
            self.expected_content_length, self.chunked_encoding = head.content_length, False
            self._head = b"".join((STATUS_LINE[message["status"]], _default_lines(self.default_headers), head.lines,
                                   b"" if self.keep_alive else b"connection: close\r\n", LINE_END))
            return
        if self._head is None or message["type"] != "http.response.body" or self.disconnected:
            await super().send(message)
            return
        lines, self._head = self._head, None
        body = message.get("body", b"")
        if len(body) > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        self.expected_content_length -= len(body)
        self.transport.write(lines + body)
        # uvicorn's own accounting of the response's end (its completion, keep-alive and next request)
        await super().send({"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)})
