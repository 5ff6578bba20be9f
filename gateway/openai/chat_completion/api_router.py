"""`POST /v1/chat/completions` (and the legacy `POST /v1/completions`), answered by raw ASGI code in
front of FastAPI's whole middleware stack (`ChatFrontApp`).

Why not a FastAPI route: on the hot path FastAPI's exception middleware, exit stack, route matching
and dependency solving were a third of the HTTP layer's CPU per request (docs/performance.md), and
this handler uses none of them: it reads and checks its own body (so size limits, errors and
metrics are handled in one place) and answers its own errors. Why in front of the stack, not a
middleware in it: Starlette's server-error middleware, FastAPI's telemetry and body-limit layers
each wrapped every request and every message it sent (8% of the gateway's samples under load).
Every other path still goes through all of FastAPI. An unexpected exception in the chat handler is
answered here with the 500 that the server-error middleware would give, then re-raised for the log."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import APIError, server_error
from gateway.openai.chat_completion.serving import ChatServing
from gateway.openai.completion.serving import CompletionServing
from gateway.request_id import RequestId

PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"  # the legacy prompt API, served the same way
SERVING: dict[str, type[ChatServing]] = {PATH: ChatServing, COMPLETIONS_PATH: CompletionServing}


class ChatCompletionsRoute:
    """Answers `POST /v1/chat/completions` and `POST /v1/completions`; passes the rest to `app`. The
    scope's `app` must be the FastAPI app, its `state.context` set (`ChatFrontApp` does both)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = SERVING.get(scope["path"][len(scope.get("root_path", "")):]) if scope["type"] == "http" else None
        if serving is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            response = APIError(405, "Method Not Allowed", headers={"Allow": "POST"}).response()
        else:
            try:
                response = await serving(scope["app"].state.context).create(scope, receive)
            except APIError as e:
                response = e.response()
            except Exception:  # a bug: nothing was sent yet, so the client gets a 500 it can read
                await server_error().response()(scope, receive, send)
                raise
        await response(scope, receive, send)


class ChatFrontApp(FastAPI):
    """FastAPI with the chat paths (and `x-request-id`, for every path) in front of its middleware
    stack: `RequestId` -> `ChatCompletionsRoute` -> FastAPI as usual."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self._front: ASGIApp = RequestId(ChatCompletionsRoute(super().__call__))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # what Starlette sets, for `request.app` on the chat paths
        if self.root_path:
            scope["root_path"] = self.root_path
        await self._front(scope, receive, send)
