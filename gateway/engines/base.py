"""The engine interface: what the HTTP layer needs from anything that generates text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from salora.messages import Messages


@dataclass(slots=True)
class GenerationRequest:
    """One completion. `adapter` None means the base model; `temperature` 0 means greedy.
    `stream` False says the caller only wants the whole answer, so an engine behind HTTP may fetch it
    in one response (and retry it elsewhere) instead of streaming it. `prompt` (the legacy
    completions API) is raw text continued as it is, with no chat template; then `messages` is empty."""

    messages: Messages
    adapter: str | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True
    prompt: str | None = None


@dataclass(slots=True)
class Chunk:
    """A text delta. The last chunk of a generation has `finish_reason` ("stop" or "length") and usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EngineError(Exception):
    """The engine cannot serve now (still loading, failed, shut down): the caller sees a 503.
    `kind` and `engine` (the engine that failed; None: the one called) label `salora_engine_errors_total`."""

    def __init__(self, message: str, kind: str = "unavailable", engine: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.engine = engine


class RequestRejected(Exception):
    """The request cannot be served as asked (e.g. the prompt is longer than the context): a 400."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class Engine(Protocol):
    """Generation behind one interface; the gateway never touches a model directly.

    `generate` is an async generator: it raises EngineError or RequestRejected before its first chunk
    when it cannot serve, and closing it early (client gone) stops the work.
    """

    name: str
    model_id: str
    error: str | None

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def load_adapter(self, name: str, path: Path) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> frozenset[str]: ...

    async def close(self) -> None: ...
