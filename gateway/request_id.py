"""`x-request-id` on every answer, as OpenAI sends it: a client's own id is kept (if it is a sane
token), otherwise one is made. It is put in the ASGI scope's state, so handlers can log it."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.response_head import PreparedHead

HEADER = b"x-request-id"
# Anything else (control characters, huge) is replaced. `fullmatch`, not `^...$`: `$` also matches
# before a final newline, and the id goes into the answer's prepared head as it is.
CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(scope: Scope) -> str:
    """The id of the request `scope` belongs to (set by RequestId)."""
    return scope.get("state", {}).get("request_id", "")


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER), b"")
        # 128 random bits, as uuid4 gives, at a quarter of its cost (no UUID object): 7 µs a request
        rid = given if CLIENT_ID.fullmatch(given) else b"req_" + os.urandom(16).hex().encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                # The id is a checked token or made here: a line the prepared head may carry as it is.
                message["headers"] = (headers.plus(b"x-request-id: %s\r\n" % rid) if type(headers) is PreparedHead
                                      else [*headers, (HEADER, rid)])
            await send(message)

        await self.app(scope, receive, tagged)
