"""A cap on request bodies for the FastAPI routes (`limits.max_body_bytes`), counted as the body
streams in. FastAPI reads a JSON body whole, before any dependency (the admin key check included)
runs, so without this an unauthenticated caller could make the gateway buffer a body of any size.
The chat route counts its own body (gateway/openai/chat_completion/serving.py) and the adapter
upload has its own, larger cap (`lifecycle.max_upload_bytes`); both sit outside this middleware."""

from __future__ import annotations

from collections.abc import Collection

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import too_large


class BodyLimit:
    """Add with `app.add_middleware(BodyLimit, limit=..., exempt={("POST", "/admin/adapters")})`."""

    def __init__(self, app: ASGIApp, limit: int, exempt: Collection[tuple[str, str]] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        error = too_large(self.limit)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error.response()(scope, receive, send)
            return
        seen, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise HTTPException(413)  # stops the app's read; its answer is replaced below
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a body it could not read: the 413 goes out instead
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await error.response()(scope, receive, send)
