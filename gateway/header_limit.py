"""A cap on request line + header bytes, enforced inside the HTTP parser (`limits.max_header_bytes`).

An ASGI middleware sees headers only once the server has buffered all of them, so a client could
make every connection hold a header of any size (a 64 MiB one was answered 200). This protocol,
uvicorn's httptools one with two checks, counts the bytes of a request's head while it is still
arriving and answers 431, in OpenAI's error shape, as soon as they pass the cap; the request never
reaches the application. Its cycles are `PreparedCycle`s (gateway/response_head.py), which write
the chat answer's prepared headers as they are."""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.response_head import PreparedCycle


def _answer(limit: int) -> bytes:
    body = json.dumps({"error": {
        "message": f"The request line and headers are larger than {limit} bytes.", "type": "invalid_request_error",
        "param": None, "code": "request_header_fields_too_large"}}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class BoundedHttpTools(HttpToolsProtocol):
    """Use `bounded_protocol(limit)`, which fixes the limit."""

    max_head_bytes = 16 << 10

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._in_head = False
        self._head_bytes = 0
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self._refused:  # all of this chunk went into a head still incomplete
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_head_bytes:
            self._refuse()
            return
        super().on_headers_complete()
        if type(self.cycle) is RequestResponseCycle:  # made just now, its task not yet started
            self.cycle.__class__ = PreparedCycle

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse(self) -> None:
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(_answer(self.max_head_bytes))
            self.transport.close()


def bounded_protocol(limit: int) -> type[BoundedHttpTools]:
    """uvicorn's `http=` for a server that refuses request heads over `limit` bytes."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {"max_head_bytes": limit})
