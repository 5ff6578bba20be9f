"""The chat paths in front of FastAPI's stack (`ChatFrontApp`): a bug in the chat handler is still
answered with the OpenAI-shaped 500 (which Starlette's server-error middleware gave when the route
sat inside it), with its `x-request-id`, and then re-raised so the server logs it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from starlette.types import Receive, Scope, Send

from gateway.openai.chat_completion.api_router import ChatCompletionsRoute
from gateway.request_id import RequestId


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("the chat path must not reach the app behind the route")


def test_a_bug_in_the_chat_handler_is_an_openai_500_then_raised() -> None:
    broken = SimpleNamespace(state=SimpleNamespace(context=object()))  # a context with nothing in it: a bug
    route = RequestId(ChatCompletionsRoute(_not_found))
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = broken
        try:
            await route(scope, receive, send)
        except Exception as e:
            raised.append(e)
            raise

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.post("/v1/chat/completions", json={"model": "m", "messages": []})

    response = asyncio.run(call())
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "The server had an error while processing your request.",
                                         "type": "server_error", "param": None, "code": "internal_error"}}
    assert response.headers["x-request-id"].startswith("req_")
    assert len(raised) == 1 and isinstance(raised[0], AttributeError)
