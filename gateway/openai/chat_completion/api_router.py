"""`POST /v1/chat/completions` (and the legacy `POST /v1/completions`), answered by a raw ASGI
middleware in front of FastAPI's routing.

Why not a FastAPI route: on the hot path FastAPI's exception middleware, exit stack, route matching
and dependency solving were a third of the HTTP layer's CPU per request (docs/performance.md), and
this handler uses none of them: it reads and checks its own body (so size limits, errors and
metrics are handled in one place) and answers its own errors. Every other path still goes through
FastAPI, and an unexpected exception still reaches Starlette's server-error middleware (a 500)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import APIError
from gateway.openai.chat_completion.serving import ChatServing
from gateway.openai.completion.serving import CompletionServing

PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"  # the legacy prompt API, served the same way
SERVING: dict[str, type[ChatServing]] = {PATH: ChatServing, COMPLETIONS_PATH: CompletionServing}


class ChatCompletionsRoute:
    """Add with `app.add_middleware(ChatCompletionsRoute)`; the app's `state.context` must be set.
    Answers `POST /v1/chat/completions` and `POST /v1/completions`."""

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
            request = Request(scope, receive, send)
            try:
                response = await serving(request.app.state.context).create(request)
            except APIError as e:
                response = e.response()
        await response(scope, receive, send)
