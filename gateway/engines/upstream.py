"""OpenAI's chat completion protocol spoken to an upstream server (vLLM, or anything OpenAI-compatible):
the request body going out, and the answer coming back as the engine's chunks.

Kept apart from replica placement (`vllm.py`) so the per-request work is small and visible: one
`json.dumps` for the body, one `json.loads` per streamed event (or one for a whole non-streamed answer),
and nothing else. Usage comes from the upstream itself (`stream_options.include_usage`), so token
metrics and limits count exactly what the upstream counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.compact_json import dumps, string
from gateway.engines.base import Chunk, EngineError, GenerationRequest, RequestRejected

JSON_HEADERS = {"content-type": "application/json"}
# The `param` of vLLM's 400 (BadRequestError) when a request does not fit the context: the prompt
# (`input_tokens`, `input_text`) or the prompt plus the answer asked for (the length parameter). The
# gateway checks max_tokens >= 1 itself, so a 400 on the length parameter is always about the context.
CONTEXT_PARAMS = frozenset({"input_tokens", "input_text", "max_tokens", "max_completion_tokens"})


CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"


def upstream_path(request: GenerationRequest) -> str:
    return CHAT_PATH if request.prompt is None else COMPLETIONS_PATH


def request_body(request: GenerationRequest, model: str) -> bytes:
    """The upstream request for `request` (a chat, or a raw prompt for its completions endpoint),
    addressed to the upstream's `model` (its base model's served name, or an adapter's `lora_name`).
    Byte for byte `json.dumps` of the request's dict (tests/gateway/test_request_body.py), with only the
    strings serialised: a dict and a full encoder pass per request cost more than the rest."""
    text = f'"messages":{dumps(request.messages)}' if request.prompt is None else f'"prompt":{string(request.prompt)}'
    body = (f'{{"model":{string(model)},{text},"max_tokens":{_number(request.max_tokens)},'
            f'"temperature":{_number(request.temperature)},"top_p":{_number(request.top_p)}')
    if request.stop:
        body += f',"stop":{dumps(list(request.stop))}'
    if request.seed is not None:
        body += f',"seed":{_number(request.seed)}'
    if request.stream:
        body += ',"stream":true,"stream_options":{"include_usage":true}'
    return (body + "}").encode()


def _number(x: float) -> str:
    """A number as `json.dumps` writes it (the repr of a finite float or an int)."""
    if type(x) is int or (type(x) is float and math.isfinite(x)):
        return repr(x)
    return dumps(x)


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """An upstream error body by its structure: OpenAI's `{"error": {"message", "type", "param"}}` (vLLM's
    `type` is its exception class, e.g. `NotFoundError`, `BadRequestError`); `type` None when the body is
    not one (the older `{"message"}`, a web framework's `{"detail"}`, plain text). Decisions are made on
    the status and `type`/`param`, never on the message, which is for people."""

    message: str
    type: str | None = None
    param: str | None = None


def upstream_error(content: bytes) -> UpstreamError:
    try:
        obj = json.loads(content)
    except ValueError:
        return UpstreamError(content.decode(errors="replace").strip()[:500] or "(empty body)")
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict):
            kind, param = error.get("type"), error.get("param")
            return UpstreamError(str(error.get("message") or obj)[:2000], kind if isinstance(kind, str) else None,
                                 param if isinstance(param, str) else None)
        if obj.get("message"):
            return UpstreamError(str(obj["message"]))
    return UpstreamError(str(obj)[:500])


def error_message(content: bytes) -> str:
    """The message of an upstream error body, for logs and error messages."""
    return upstream_error(content).message


def rejected(content: bytes) -> RequestRejected:
    """An upstream 400: the request cannot be served as asked; keep OpenAI's `param` and name a request
    that does not fit the context `context_length_exceeded`, as the local engine does."""
    error = upstream_error(content)
    code = "context_length_exceeded" if error.param in CONTEXT_PARAMS else "invalid_request"
    return RequestRejected(error.message, code=code, param=error.param)


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
