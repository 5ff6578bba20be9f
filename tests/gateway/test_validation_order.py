"""The chat and completions routes validate a body with the fields model first, then with the whole
request model when that fails (gateway/openai/chat_completion/protocol.py): no body may come out
differently from what the whole model alone gives."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from gateway.errors import APIError, invalid_body
from gateway.openai.chat_completion.serving import ChatServing
from gateway.openai.completion.serving import CompletionServing


BODIES = [
    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stop": "x", "seed": 3},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": False, "tools": []},  # off: dropped
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},  # on: refused naming it
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "nonsense": 1},
    {"model": "m", "messages": []},
    {"model": "m", "prompt": "once upon", "best_of": 1, "echo": False},
    {"model": "m", "prompt": ["a", "b"]},
]


@pytest.mark.parametrize("serving_class", [ChatServing, CompletionServing])
@pytest.mark.parametrize("body", BODIES)
def test_validating_the_fields_first_changes_no_outcome(serving_class: type[ChatServing], body: dict) -> None:
    """The route validates with the fields model first and falls back to the whole request model:
    every body must come out as the whole model alone would have it, accepted alike or refused with
    the same errors."""
    raw = json.dumps(body).encode()
    serving = serving_class(None)  # type: ignore[arg-type]  # _validate reads no context
    try:
        expected: object = serving.request_model.model_validate_json(raw).model_dump()
    except ValidationError as e:
        expected = invalid_body(e.errors()).body()
    try:
        got: object = serving._validate(raw).model_dump()
    except APIError as e:
        got = e.body()
    assert got == expected
