"""`POST /v1/chat/completions`: check, route to the engine, answer as JSON or as server-sent events.

Every request is counted once in `salora_requests_total`, with its HTTP status ("499" when the
client left first). A completed answer is classified by the refusal judge after its last byte is
sent (a background task), so the judge adds no latency."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import authenticate_bearer
from gateway.compact_json import dumps, string
from gateway.context import Context
from gateway.engines.base import Chunk, EngineError, GenerationRequest, RequestRejected
from gateway.errors import (
    APIError,
    bad_request,
    invalid_body,
    model_not_found,
    rate_limited,
    too_large,
    too_many_streams,
    unavailable,
)
from gateway.metrics import OTHER
from gateway.openai.chat_completion.protocol import ChatCompletionFields, ChatCompletionRequest
from gateway.ratelimit import Headroom, Limited, Reservation
from gateway.request_id import request_id
from gateway.request_log import log_request
from gateway.response_head import PreparedHead, pairs
from gateway.tenants import Tenant
from salora.messages import prompt_text

log = logging.getLogger(__name__)


# A temperature this small is greedy decoding: dividing scores by 1e-40 gives infinities, and the
# NaN they turn into would end the request (every engine treats it the same way through this floor).
MIN_TEMPERATURE = 1e-3
# The tokens a prompt is reserved under tpm before it is tokenized: a byte-level tokenizer spends at
# least one byte per token, and the chat template adds a few tokens per message and a default system
# prompt. The reservation is settled to the engine's exact count when the answer is done.
TEMPLATE_TOKENS_PER_MESSAGE, TEMPLATE_TOKENS = 16, 64


def prompt_token_bound(messages: list[dict[str, str]]) -> int:
    return TEMPLATE_TOKENS + sum(len(m["content"].encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)


def _limit_headers(headroom: tuple[Headroom, ...]) -> bytes:
    """OpenAI's `x-ratelimit-*` headers for a tenant with limits (none for one without), as the
    header lines the JSON answer sends as they are (gateway/response_head.py)."""
    return b"".join(_LIMIT_LINES[room.kind] % (room.limit, room.remaining, room.reset_s) for room in headroom)


class _LimitLines(dict[str, bytes]):
    """kind -> the format of its three header lines (made once per kind)."""

    def __missing__(self, kind: str) -> bytes:
        line = (f"x-ratelimit-limit-{kind}: %d\r\nx-ratelimit-remaining-{kind}: %d\r\n"
                f"x-ratelimit-reset-{kind}: %.3fs\r\n").encode()
        self[kind] = line
        return line


_LIMIT_LINES = _LimitLines()


def _as_dict(lines: bytes) -> dict[str, str]:
    """Header lines as the `headers=` of an error or a Starlette response."""
    return {k.decode(): v.decode() for k, v in pairs(lines)}


def _nothing() -> None:
    """The release of a request that holds no stream slot."""


@dataclass(eq=False)
class _Answer:
    """One completion as it is produced, and its accounting once it is over."""

    ctx: Context
    tenant: Tenant
    model: str
    prompt: str
    started: float
    reservation: Reservation
    request_id: str = ""
    user: str | None = None
    ttft: float = 0.0
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = "499"  # until the answer completes or fails

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, chunk: Chunk) -> None:
        self.parts.append(chunk.text)
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason, self.status = chunk.finish_reason, "200"

    def failed(self, error: EngineError) -> None:
        self.status = "503"
        self.ctx.metrics.engine_errors.labels(error.engine or self.ctx.engine.name, error.kind).inc()

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def record(self) -> None:
        """After the last byte: metrics and the tokens-per-minute charge; then the judge's verdict on a
        completed answer (a blocking judge's detached from the connection)."""
        m, tenant, model = self.ctx.metrics, self.tenant.name, self.model
        series = m.answer(tenant, model)
        if self.status == "200":
            series.ok.inc()
        else:
            m.requests.labels(tenant, model, self.status).inc()
        series.duration.observe(time.perf_counter() - self.started)
        series.ttft.observe(self.ttft)
        series.prompt_tokens.inc(self.prompt_tokens)
        series.completion_tokens.inc(self.completion_tokens)
        if self.status == "200":  # exact counts; a failed or abandoned answer keeps its whole reservation
            self.reservation.settle(self.prompt_tokens + self.completion_tokens)
        style = self.ctx.settings.request_log
        if style != "off":
            log_request(style, self.request_id, tenant, model, self.status, self.prompt_tokens,
                        self.completion_tokens, time.perf_counter() - self.started, self.user)
        if self.status == "200":
            if getattr(self.ctx.judge, "blocking", True):
                self.ctx.spawn(self._judge())
            else:
                await self._judge()

    async def _judge(self) -> None:
        """A blocking judge (a remote model) runs in a worker thread and must never stall the loop. A
        non-blocking one (the keyword judge) runs inline: it costs microseconds, and handing it to a
        thread cost a fifth of the gateway's CPU per request in GIL hand-offs (docs/performance.md)."""
        judge, answer = self.ctx.judge, self.text
        try:
            if getattr(judge, "blocking", True):
                refused = await to_thread.run_sync(judge.is_refusal, self.prompt, answer)
            else:
                refused = judge.is_refusal(self.prompt, answer)
        except Exception:
            log.exception("the %s judge failed; answer left unclassified", self.ctx.judge.name)
            return
        series = self.ctx.metrics.answer(self.tenant.name, self.model)
        (series.refused if refused else series.not_refused).inc()


class _EventStream(StreamingResponse):
    """Closes the event generator however the response ends. Starlette stops iterating when the
    client leaves but leaves a generator suspended at a `yield` open; closing it here stops the
    engine row at once instead of whenever the garbage collector gets to it. Then it frees the
    tenant's stream slot (`release`), whether the stream finished, failed or was abandoned."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _head(scope: Scope) -> tuple[str, bytes]:
    """The request's `authorization` (latin-1, as Starlette decodes it) and `content-length`
    headers, in one pass over the raw list (the first of each, as Starlette's `Headers.get`)."""
    authorization = length = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value
        elif name == b"content-length" and length is None:
            length = value
    return (authorization or b"").decode("latin-1"), length or b""


async def _read_body(receive: Receive, length: bytes, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it passes `limit` (declared or counted); a
    client gone mid-body raises Starlette's ClientDisconnect, as `Request.stream` does."""
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_large(limit)
            if not message.get("more_body", False):
                return body
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _JSONAnswer:
    """A whole answer, sent as prepared header lines and body bytes, then accounted for: what
    Starlette's JSONResponse with a BackgroundTask did, without its dict rendering, header
    encoding and callable checks per request (docs/performance.md)."""

    __slots__ = ("headers", "body", "answer")

    def __init__(self, headers: PreparedHead, body: bytes, answer: _Answer) -> None:
        self.headers, self.body, self.answer = headers, body, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})
        await self.answer.record()


class ChatServing:
    """The chat API. `CompletionServing` (gateway/openai/completion/serving.py) reuses every step
    (auth, limits, admission, engine, accounting) and changes only the request and answer shapes."""

    request_model: type[BaseModel] = ChatCompletionRequest
    fields_model: type[BaseModel] = ChatCompletionFields  # validated first (protocol.py says why)
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def create(self, scope: Scope, receive: Receive) -> ASGIApp:
        """The response to one request (raises APIError for every error answer). Reads the scope and
        the body itself: a Starlette `Request` and its `Headers` cost more than this path uses."""
        ctx, started = self.ctx, time.perf_counter()
        tenant_label = adapter_label = OTHER
        authorization, length = _head(scope)
        try:
            tenant = authenticate_bearer(ctx, authorization)
            tenant_label = tenant.name
            body = self._validate(await _read_body(receive, length, ctx.settings.limits.max_body_bytes))
            if not ctx.engine.ready:
                raise unavailable(ctx.engine.error or "The model is still loading; retry shortly.")
            generation = self._generation_request(body, tenant)
            adapter_label = body.model
            release = await self._stream_slot(tenant) if body.stream else _nothing
            try:
                admitted = await ctx.limiter.admit(tenant, self._prompt_bound(generation) + generation.max_tokens)
                headers = _limit_headers(admitted.headroom)
                if isinstance(admitted, Limited):
                    error = rate_limited(admitted)
                    error.headers = {**(error.headers or {}), **_as_dict(headers)}
                    raise error
                stream = ctx.engine.generate(generation)
                try:
                    first = await anext(stream)
                except EngineError as e:
                    admitted.settle(0)  # nothing was generated
                    ctx.metrics.engine_errors.labels(e.engine or ctx.engine.name, e.kind).inc()
                    raise unavailable(str(e)) from None
                except RequestRejected as e:
                    admitted.settle(0)
                    raise bad_request(str(e), param=e.param, code=e.code) from None
            except BaseException:
                release()
                raise
        except APIError as e:
            ctx.metrics.requests.labels(tenant_label, adapter_label, str(e.status)).inc()
            if ctx.settings.request_log != "off":
                log_request(ctx.settings.request_log, request_id(scope), tenant_label, adapter_label,
                            str(e.status), 0, 0, time.perf_counter() - started, None)
            raise
        answer = _Answer(ctx, tenant, body.model, self._judged_prompt(generation), started, admitted,
                         request_id(scope), body.user, ttft=time.perf_counter() - started,
                         id=f"{self.id_prefix}{os.urandom(16).hex()}")  # uuid4's bits, without its object
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(self._events(answer, first, stream, include_usage, release), release,
                                headers=_as_dict(headers),
                                media_type="text/event-stream", background=BackgroundTask(answer.record))
        return await self._complete(receive, answer, first, stream, headers)

    def _validate(self, raw: bytes) -> Any:
        try:
            return self.fields_model.model_validate_json(raw)
        except ValidationError:
            pass
        try:
            return self.request_model.model_validate_json(raw)
        except ValidationError as e:
            raise invalid_body(e.errors()) from None

    async def _stream_slot(self, tenant: Tenant) -> Callable[[], None]:
        limit = self.ctx.settings.limits.max_concurrent_streams
        release = await self.ctx.streams.acquire(tenant.name, limit)
        if release is None:
            raise too_many_streams(limit)
        return release

    def _inputs(self, body: Any) -> GenerationRequest:
        """The request's text: its messages, content guarded (gateway/control_tokens.py)."""
        limits = self.ctx.settings.limits
        if len(body.messages) > limits.max_messages:
            raise bad_request(f"{len(body.messages)} messages; this gateway allows at most {limits.max_messages}.",
                              param="messages", code="too_many_messages")
        return GenerationRequest(messages=self.ctx.content_guard.messages([m.as_dict() for m in body.messages]))

    @staticmethod
    def _prompt_bound(generation: GenerationRequest) -> int:
        return prompt_token_bound(generation.messages)

    @staticmethod
    def _judged_prompt(generation: GenerationRequest) -> str:
        return prompt_text(generation.messages)

    def _generation_request(self, body: Any, tenant: Tenant) -> GenerationRequest:
        limits = self.ctx.settings.limits
        try:
            adapter = self.ctx.catalog.resolve(tenant, body.model)
        except KeyError:
            raise model_not_found(body.model) from None
        generation = self._inputs(body)
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise bad_request(f"{param} is {max_tokens}; this gateway allows at most {limits.max_tokens}.",
                              param=param, code="max_tokens_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        # Set on the request `_inputs` just made (no one else holds it): `dataclasses.replace` cost
        # more than the rest of this function.
        generation.adapter, generation.max_tokens = adapter, max_tokens
        generation.temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
        generation.top_p = 1.0 if body.top_p is None else body.top_p
        generation.stop, generation.seed, generation.stream = tuple(body.stop), body.seed, bool(body.stream)
        return generation

    @staticmethod
    def _choice(text: str, finish_reason: str | None) -> str:
        """The JSON of the answer's one choice."""
        return (f'{{"index":0,"message":{{"role":"assistant","content":{string(text)}}},"logprobs":null,'
                f'"finish_reason":{string(finish_reason)}}}')

    @staticmethod
    def _first_delta() -> dict[str, str] | None:
        """What a stream's first event carries before any text (the chat API's role)."""
        return {"role": "assistant", "content": ""}

    @staticmethod
    def _delta(text: str | None) -> str:
        """The JSON of a streamed event's choice up to its `logprobs` (text None: the final event)."""
        return f'"delta":{dumps({} if text is None else {"content": text})}'

    async def _complete(self, receive: Receive, answer: _Answer, first: Chunk, stream: AsyncIterator[Chunk],
                        headers: bytes) -> ASGIApp:
        """Collect the whole answer, unless the client leaves first: then stop generating. An engine
        whose first chunk is the whole answer (vLLM's non-streamed one) has nothing left to wait for:
        no watcher task then, which was two tasks and a wait per request (docs/performance.md)."""
        if first.finish_reason is not None:
            async with aclosing(stream):  # type: ignore[type-var]
                answer.add(first)
                async for chunk in stream:  # the stream's end, at once (its connection goes back to the pool)
                    answer.add(chunk)
            return self._json(answer, headers)

        async def collect() -> None:
            async with aclosing(stream):  # type: ignore[type-var]
                answer.add(first)
                async for chunk in stream:
                    answer.add(chunk)

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            work.cancel()  # a no-op when it finished; else closing the stream stops the engine row
        if work not in done:
            await answer.record()
            return Response(status_code=499)
        error = work.exception()
        if isinstance(error, EngineError):
            answer.failed(error)
            await answer.record()
            raise unavailable(str(error))
        if error is not None:
            raise error
        return self._json(answer, headers)

    def _json(self, answer: _Answer, headers: bytes) -> _JSONAnswer:
        """The answer's JSON, byte for byte what `json.dumps(..., ensure_ascii=False, separators=(",",
        ":"))` of its dict gives (Starlette's JSONResponse): the constant parts are literals, only the
        strings are serialised (tests/gateway/test_answer_json.py)."""
        body = (f'{{"id":"{answer.id}","object":"{self.object}","created":{answer.created},"model":{string(answer.model)},'
                f'"choices":[{self._choice(answer.text, answer.finish_reason)}],"usage":{{"prompt_tokens":'
                f'{answer.prompt_tokens},"completion_tokens":{answer.completion_tokens},"total_tokens":'
                f'{answer.prompt_tokens + answer.completion_tokens}}}}}').encode()
        head = PreparedHead(b"%scontent-length: %d\r\ncontent-type: application/json\r\n" % (headers, len(body)), len(body))
        return _JSONAnswer(head, body, answer)

    async def _events(self, answer: _Answer, first: Chunk, stream: AsyncIterator[Chunk], include_usage: bool,
                      release: Callable[[], None]) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. The stream slot is
        freed (`release`) once the last event is out but before the body's end: a client that opens
        its next stream as soon as this one ends must find the slot free (the response's own release
        comes only after the background task, and lost that race at the cap)."""
        try:
            head = {"id": answer.id, "object": self.chunk_object, "created": answer.created, "model": answer.model}
            # Everything around the delta is the same in every event: serialised once per stream, not per token.
            prefix = f'data: {dumps(head)[:-1]},"choices":[{{"index":0,'
            suffix = ',"usage":null}\n\n' if include_usage else "}\n\n"

            def event(delta: str, finish_reason: str | None = None) -> str:
                return f'{prefix}{delta},"logprobs":null,"finish_reason":{string(finish_reason)}}}]{suffix}'

            async with aclosing(stream):  # type: ignore[type-var]
                opening = self._first_delta()
                if opening is not None:
                    yield event(f'"delta":{dumps(opening)}')
                chunk = first
                while True:
                    answer.add(chunk)
                    if chunk.text:
                        yield event(self._delta(chunk.text))
                    if chunk.finish_reason is not None:
                        yield event(self._delta(None), chunk.finish_reason)
                        break
                    try:
                        chunk = await anext(stream)
                    except EngineError as e:
                        answer.failed(e)
                        yield f"data: {dumps(unavailable(str(e)).body())}\n\n"
                        return
            if include_usage:
                yield f"data: {dumps({**head, 'choices': [], 'usage': answer.usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            release()
