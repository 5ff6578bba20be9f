"""The body the vLLM engine sends upstream is written from literals and serialised strings
(gateway/engines/upstream.py `request_body`): it must stay byte for byte `json.dumps` of the
request's dict, for any text, numbers and options a request can carry."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.engines.base import GenerationRequest
from gateway.engines.upstream import request_body

MESSAGES = [{"role": "system", "content": "ünïcödé — 日本語 🙂"},
            {"role": "user", "content": 'quote " backslash \\ newline\n tab\t nul\x00 \u2028'}]


def _expected(request: GenerationRequest, model: str) -> bytes:
    text: dict[str, Any] = {"messages": request.messages} if request.prompt is None else {"prompt": request.prompt}
    body: dict[str, Any] = {"model": model, **text, "max_tokens": request.max_tokens,
                            "temperature": request.temperature, "top_p": request.top_p}
    if request.stop:
        body["stop"] = request.stop
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("request_", [
    GenerationRequest(messages=MESSAGES),
    GenerationRequest(messages=MESSAGES, max_tokens=1, temperature=0.0, top_p=0.1 + 0.2, stream=False),
    GenerationRequest(messages=MESSAGES, temperature=1, top_p=1, stop=("\n\n", "ü", '"'), seed=-(1 << 63)),
    GenerationRequest(messages=MESSAGES, temperature=1e-3, top_p=2 / 3, seed=0, stream=True),
    GenerationRequest(messages=[], prompt="Once upon a time 🙂", temperature=1.9999999999999998, stop=("x",)),
    GenerationRequest(messages=[], prompt="", max_tokens=8192, temperature=float("nan"), top_p=float("inf")),
])
@pytest.mark.parametrize("model", ["base", 'lora-"ü"/x'])
def test_body_is_json_dumps_of_the_request(request_: GenerationRequest, model: str) -> None:
    assert request_body(request_, model) == _expected(request_, model)
