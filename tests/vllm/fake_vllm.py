"""A stand-in for a vLLM OpenAI server, for the engine's placement, eviction and failure tests.

Real vLLM servers are used where the point is vLLM itself (test_vllm_server.py, test_vllm_replicas.py);
each takes 5 GiB and 40 s to start on this machine, so the cases that need three replicas, a dead one
brought back, or a replica that mounts the adapter volume elsewhere use this fake. Its answers have
the structure of vLLM 0.32's as recorded from a real server (statuses; error bodies with vLLM's
`type` and `param`; `parent` on adapters in `/v1/models`; usage after the finish event of a stream)
but messages of its own wording: the engine must recognise a failure by its status, type and param,
never by a message (tests/vllm/test_vllm_server.py checks the same cases on a real server).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse


def _error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": status}}, status_code=status)


class FakeVLLM:
    """One fake replica. `mount` maps the directory prefix vLLM would see to where the files really
    are (None: it cannot see the adapter volume at all); `lora` False is a server started without
    runtime adapter loading. An answer echoes the model it ran on: `[model] prompt`, one token per
    word, so a test sees which adapter (and, through `served`, which replica) produced it."""

    def __init__(self, model: str = "base", mount: tuple[str, Path] | None = None, lora: bool = True,
                 max_lora_rank: int = 64, max_model_len: int = 512, specials: dict[str, int] | None = None) -> None:
        self.model, self.mount, self.max_lora_rank, self.max_model_len = model, mount, max_lora_rank, max_model_len
        self.specials = specials  # its vocabulary's special tokens; None: no /tokenize (not every server has it)
        self.adapters: dict[str, str] = {}
        self.started: Counter[str] = Counter()  # chat requests begun, by model
        self.served: Counter[str] = Counter()  # completed chat requests by model
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.fail_chat: list[int] = []  # statuses to answer the next chat requests with
        self.hold = threading.Event()  # a prompt containing "[hold]" waits for this before finishing
        self.hold.set()
        self.app = self._build(lora)

    def _readable(self, path: str) -> Path | None:
        if self.mount is None or not path.startswith(self.mount[0]):
            return None
        real = self.mount[1] / path[len(self.mount[0]):].lstrip("/")
        return real if (real / "adapter_config.json").is_file() else None

    def _build(self, lora: bool) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            cards = [{"id": self.model, "object": "model", "root": "/models/base", "parent": None,
                      "max_model_len": self.max_model_len}]
            cards += [{"id": n, "object": "model", "root": p, "parent": self.model} for n, p in self.adapters.items()]
            return {"object": "list", "data": cards}

        if lora:
            @app.post("/v1/load_lora_adapter")
            async def load(request: Request) -> Response:
                body = await request.json()
                name, path = body["lora_name"], body["lora_path"]
                if name in self.adapters and not body.get("load_inplace"):
                    return _error(400, f"fake: {name} is taken", "InvalidUserInput")
                real = self._readable(path)
                if real is None:
                    return _error(404, f"fake: nothing readable at {path}", "NotFoundError")
                rank = json.loads((real / "adapter_config.json").read_text())["r"]
                if rank > self.max_lora_rank:
                    return _error(400, f"fake: rank {rank} over the limit {self.max_lora_rank}", "BadRequestError")
                self.adapters[name] = path
                self.loads.append(name)
                return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

            @app.post("/v1/unload_lora_adapter")
            async def unload(request: Request) -> Response:
                name = (await request.json())["lora_name"]
                if self.adapters.pop(name, None) is None:
                    return _error(404, f"fake: no {name} to unload", "NotFoundError")
                self.unloads.append(name)
                return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        if self.specials is not None:
            specials = self.specials

            @app.post("/tokenize")
            async def tokenize(request: Request) -> Response:
                """Special tokens by their spelling, anything else one token a character (id -1)."""
                text, tokens = (await request.json())["prompt"], []
                while text:
                    found = next((t for t in specials if text.startswith(t)), None)
                    tokens.append(specials[found] if found else -1)
                    text = text[len(found) if found else 1:]
                return JSONResponse({"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            model = body["model"]
            if self.fail_chat:
                return _error(self.fail_chat.pop(0), "injected failure", "InternalServerError")
            if model != self.model and model not in self.adapters:
                return _error(404, f"fake: no model {model}", "NotFoundError", "model")
            if body["max_tokens"] > self.max_model_len:
                return _error(400, f"fake: {body['max_tokens']} tokens do not fit in {self.max_model_len}",
                              "BadRequestError", "max_tokens")
            self.started[model] += 1
            prompt = body["messages"][-1]["content"]
            words = f"[{model}] {prompt}".split(" ")
            tokens = [w if i == 0 else " " + w for i, w in enumerate(words)][: body["max_tokens"]]
            finish = "length" if len(tokens) < len(words) else "stop"
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens),
                     "total_tokens": len(prompt.split()) + len(tokens)}
            hold = "[hold]" in prompt
            if not body.get("stream"):
                await self._wait(hold)
                self.served[model] += 1
                return JSONResponse({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                                 "logprobs": None, "finish_reason": finish}], "usage": usage})
            return StreamingResponse(self._events(model, tokens, finish, usage, hold), media_type="text/event-stream")

        return app

    async def _wait(self, hold: bool) -> None:
        while hold and not self.hold.is_set():
            await asyncio.sleep(0.01)

    async def _events(self, model: str, tokens: list[str], finish: str, usage: dict[str, int],
                      hold: bool) -> AsyncIterator[str]:
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        def event(delta: dict[str, str], finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        yield event({"role": "assistant", "content": ""})
        for token in tokens[:-1]:
            yield event({"content": token})
        await self._wait(hold)
        yield event({"content": tokens[-1]}, finish)
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
        self.served[model] += 1


class FakeServer:
    """A FakeVLLM served by uvicorn on a port of its own, in a thread; `stop` and `start` again on
    the same port play a replica dying and coming back (with no adapters, like a restarted vLLM)."""

    def __init__(self, fake: FakeVLLM, port: int = 0) -> None:
        self.fake, self.port = fake, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._server = uvicorn.Server(uvicorn.Config(self.fake.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the fake vLLM did not start"
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self.fake.hold.set()
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None
            self.fake.adapters.clear()
