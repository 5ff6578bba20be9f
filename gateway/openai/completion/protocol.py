"""The legacy completions API (`POST /v1/completions`): a raw prompt continued as it is, with no chat
template. The same rules as the chat API (gateway/openai/chat_completion/protocol.py): what is
accepted is honoured, anything else is a 400 naming it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.openai.chat_completion.protocol import INT64, OFF, NonEmpty, Stops, StreamOptions, Usage, refuse_unsupported

# Completions fields this gateway does not implement: refused unless sent at their "off" value.
UNSUPPORTED = ("logprobs", "echo", "suffix", "best_of", "frequency_penalty", "presence_penalty", "logit_bias")
Prompt = Annotated[str, Field(min_length=1)]


class CompletionFields(BaseModel):
    """The request's fields alone, validated first (as `ChatCompletionFields`, for the same reason)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)]  # one prompt per request
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Stops = Field(default_factory=list, json_schema_extra={"default": []})  # not `= []`: that default is deep-copied per request
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    n: Literal[1] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop", mode="before", json_schema_input_type=NonEmpty | Stops | None)
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [] if v is None else [v] if isinstance(v, str) else v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def max_completion_tokens(self) -> None:  # the chat API's newer name; completions have only max_tokens
        return None


class CompletionRequest(CompletionFields):
    """The completions request: its fields, and the unimplemented ones refused unless they are off."""

    @model_validator(mode="before")
    @classmethod
    def _unsupported_off(cls, data: object) -> object:
        # best_of 1 is its "off" value: one candidate, the answer itself
        if isinstance(data, dict) and data.get("best_of") == 1:
            data = {k: v for k, v in data.items() if k != "best_of"}
        return refuse_unsupported(data, UNSUPPORTED, OFF)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(BaseModel):
    """The answer to a request without `stream`; with it, each `data:` event is a Completion holding
    the new text (`object` "text_completion" in both), ending with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
