"""`POST /v1/completions`: the chat route's every step (gateway/openai/chat_completion/serving.py),
with a raw prompt in and text choices out."""

from __future__ import annotations

from typing import Any

from gateway.compact_json import string
from gateway.engines.base import GenerationRequest
from gateway.openai.chat_completion.serving import ChatServing
from gateway.openai.completion.protocol import CompletionFields, CompletionRequest


class CompletionServing(ChatServing):
    request_model, fields_model = CompletionRequest, CompletionFields
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def _inputs(self, body: Any) -> GenerationRequest:
        return GenerationRequest(messages=[], prompt=body.text)

    @staticmethod
    def _prompt_bound(generation: GenerationRequest) -> int:
        assert generation.prompt is not None
        return len(generation.prompt.encode()) + 2  # no template: its bytes, and a BOS token some tokenizers add

    @staticmethod
    def _judged_prompt(generation: GenerationRequest) -> str:
        assert generation.prompt is not None
        return generation.prompt

    @staticmethod
    def _choice(text: str, finish_reason: str | None) -> str:
        return (f'{{"index":0,"text":{string(text)},"logprobs":null,'
                f'"finish_reason":{string(finish_reason)}}}')

    @staticmethod
    def _first_delta() -> None:
        return None

    @staticmethod
    def _delta(text: str | None) -> str:
        return f'"text":{string(text or "")}'
