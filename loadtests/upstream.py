"""A fake OpenAI-compatible upstream (vLLM-shaped) that answers at once or at a fixed per-token pace.

It stands in for the engine so that a load test measures the gateway and not a model. It is a raw
ASGI app (no framework) with every answer body precomputed per length, so it costs the shared CPUs
as little as possible. An answer has `max_tokens` tokens (default `--tokens`); streams send one
event per token, `--token-delay-ms` apart (the first one too, so that is the time to first token).
`POST /fake/config {"token_delay_ms": 20}` changes the pace at run time, so one set of processes
serves both the instant and the paced phases of a benchmark.

    python -m loadtests.upstream --port 9000 --token-delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

import uvicorn

MODEL = "fake-model"
TOKEN = " hello"  # one token of every answer; never a refusal, so the judge has work to do
PROMPT_TOKENS = 16  # reported usage; the fake does not tokenise

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": PROMPT_TOKENS + tokens}


@lru_cache(maxsize=4096)
def completion_body(model: str, tokens: int, finish_reason: str) -> bytes:
    return _dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TOKEN * tokens},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": _usage(tokens),
    })


@lru_cache(maxsize=4096)
def stream_events(model: str, tokens: int, finish_reason: str, include_usage: bool) -> tuple[bytes, bytes, bytes]:
    """(first event: the role, one token's event, the closing events) of a stream."""
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model}

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + _dumps({**head, "choices": [choice]}) + b"\n\n"

    closing = event({}, finish_reason)
    if include_usage:
        closing += b"data: " + _dumps({**head, "choices": [], "usage": _usage(tokens)}) + b"\n\n"
    return event({"role": "assistant", "content": ""}), event({"content": TOKEN}), closing + b"data: [DONE]\n\n"


class FakeUpstream:
    """The ASGI app. `adapters` grows with vLLM's runtime `/v1/load_lora_adapter`, so an engine that
    loads adapters at start finds what it expects."""

    def __init__(self, model: str = MODEL, tokens: int = 16, token_delay_s: float = 0.0) -> None:
        self.model, self.tokens, self.delay = model, tokens, token_delay_s
        self.adapters: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # served with lifespan="off": nothing to set up
            return
        method, path = scope["method"], scope["path"]
        body = await _read(receive)
        if method == "POST" and path == "/v1/chat/completions":
            await self._chat(json.loads(body), send)
        elif method == "GET" and path in ("/health", "/ping"):
            await _respond(send, 200, b"")
        elif method == "GET" and path == "/v1/models":
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in (self.model, *sorted(self.adapters))]
            await _respond(send, 200, _dumps({"object": "list", "data": models}), JSON_HEADERS)
        elif method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            name = json.loads(body).get("lora_name", "")
            (self.adapters.add if path.startswith("/v1/load") else self.adapters.discard)(name)
            await _respond(send, 200, b"Success")
        elif method == "POST" and path == "/fake/config":
            self.delay = float(json.loads(body)["token_delay_ms"]) / 1000
            await _respond(send, 200, b"")
        else:
            await _respond(send, 404, _dumps({"error": {"message": f"no route {method} {path}"}}), JSON_HEADERS)

    async def _chat(self, request: dict[str, Any], send: Send) -> None:
        model = request.get("model", self.model)
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        tokens = min(limit, self.tokens) if limit else self.tokens
        finish = "length" if limit and limit <= self.tokens else "stop"
        if not request.get("stream"):
            if self.delay:
                await asyncio.sleep(self.delay * tokens)
            await _respond(send, 200, completion_body(model, tokens, finish), JSON_HEADERS)
            return
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        first, token, closing = stream_events(model, tokens, finish, include_usage)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        for _ in range(tokens):
            if self.delay:
                await asyncio.sleep(self.delay)
            await send({"type": "http.response.body", "body": token, "more_body": True})
        await send({"type": "http.response.body", "body": closing})


async def _read(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--model", default=MODEL, help="the base model's id in /v1/models")
    p.add_argument("--tokens", type=int, default=16, help="answer length when the request sets no max_tokens")
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="pause before each token (0: instant)")
    args = p.parse_args(argv)
    app = FakeUpstream(args.model, args.tokens, args.token_delay_ms / 1000)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", lifespan="off", backlog=4096)


if __name__ == "__main__":
    main()
