"""OpenAI's chat completion protocol spoken to an upstream server (vLLM, or anything OpenAI-compatible):
the request body going out, and the answer coming back as the engine's chunks.

Kept apart from replica placement (`vllm.py`) so the per-request work is small and visible: one
`json.dumps` for the body, one `json.loads` per streamed event (or one for a whole non-streamed answer),
and nothing else. Usage comes from the upstream itself (`stream_options.include_usage`), so token
metrics and limits count exactly what the upstream counted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.engines.base import Chunk, EngineError, GenerationRequest, RequestRejected

JSON_HEADERS = {"content-type": "application/json"}
_CONTEXT_WORDS = ("maximum context length", "max_model_len")  # how vLLM words a request too long for the model


CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"


def upstream_path(request: GenerationRequest) -> str:
    return CHAT_PATH if request.prompt is None else COMPLETIONS_PATH


def request_body(request: GenerationRequest, model: str) -> bytes:
    """The upstream request for `request` (a chat, or a raw prompt for its completions endpoint),
    addressed to the upstream's `model` (its base model's served name, or an adapter's `lora_name`)."""
    text: dict[str, Any] = {"messages": request.messages} if request.prompt is None else {"prompt": request.prompt}
    body: dict[str, Any] = {
        "model": model,
        **text,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.stop:
        body["stop"] = request.stop
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def error_message(content: bytes) -> str:
    """The message of an upstream error body: OpenAI's `{"error": {"message"}}`, the older vLLM
    `{"message"}`, or the raw text."""
    try:
        obj = json.loads(content)
    except ValueError:
        return content.decode(errors="replace").strip()[:500] or "(empty body)"
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if obj.get("message"):
            return str(obj["message"])
    return str(obj)[:500]


def rejected(content: bytes) -> RequestRejected:
    """An upstream 400: the request cannot be served as asked; keep OpenAI's `param` and name a too
    long request `context_length_exceeded`, as the local engine does."""
    message = error_message(content)
    param = None
    try:
        error = json.loads(content).get("error")
        param = error.get("param") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        pass
    code = "context_length_exceeded" if any(w in message for w in _CONTEXT_WORDS) else "invalid_request"
    return RequestRejected(message, code=code, param=param if isinstance(param, str) else None)


def parse_completion(content: bytes) -> Chunk:
    """A whole non-streamed answer as one final chunk."""
    try:
        obj = json.loads(content)
        choice = obj["choices"][0]
        usage = obj.get("usage") or {}
        text = choice["message"].get("content") if "message" in choice else choice["text"]
        return Chunk(text or "", choice.get("finish_reason") or "stop",
                     usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise EngineError(f"the upstream sent a malformed answer ({e!r})", kind="upstream") from e


async def stream_chunks(lines: AsyncIterator[str]) -> AsyncIterator[Chunk]:
    """Server-sent events of an upstream stream (chat deltas, or completions' text) as chunks: one per
    non-empty delta, then a
    final empty chunk with the finish reason and the usage (sent by the upstream after the finish)."""
    finish: str | None = None
    prompt_tokens = completion_tokens = 0
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            continue  # read on to the end of the body, so the connection goes back to the pool
        try:
            event = json.loads(data)
        except ValueError as e:
            raise EngineError(f"the upstream sent a malformed event ({data[:200]!r})", kind="upstream") from e
        if "error" in event:
            raise EngineError(f"the upstream failed mid-stream: {error_message(data.encode())}", kind="upstream")
        usage = event.get("usage")
        if usage:
            prompt_tokens, completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if text:
                yield Chunk(text)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    if finish is None:
        raise EngineError("the upstream stream ended before the answer finished", kind="upstream")
    yield Chunk("", finish, prompt_tokens, completion_tokens)
