"""The subset of OpenAI's chat completion API the gateway serves. A field it accepts, it honours;
any other field is a 400 naming it (OpenAI's own API refuses unknown arguments too), except that an
OpenAI field the gateway does not implement may be sent at its "off" value (null, false, 0, empty),
as some clients always send `logprobs: false` or `tools: []`. docs/api.md lists every field. Fields
are strict (no "5" for 5, no 1 for true), as in OpenAI's API, so the published schema is exactly what is
accepted. The response models document what the route writes (it builds its JSON by hand on the hot
path) and give /openapi.json its schemas (gateway/openapi.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

NonEmpty = Annotated[str, Field(min_length=1)]
Stops = Annotated[list[NonEmpty], Field(max_length=4)]
INT64 = 1 << 63


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """The plain {role, content} the chat template takes; `developer` is OpenAI's new `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False


# OpenAI request fields this gateway does not implement: refused unless sent at their "off" value.
UNSUPPORTED = ("logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
               "functions", "function_call", "frequency_penalty", "presence_penalty", "logit_bias", "audio",
               "modalities", "prediction", "reasoning_effort", "web_search_options", "service_tier", "store",
               "metadata", "verbosity", "prompt_cache_key", "safety_identifier")
OFF = (None, False, 0, 0.0, [], {}, "")


def refuse_unsupported(data: object, unsupported: tuple[str, ...], off: tuple[object, ...]) -> object:
    """Drop the unimplemented OpenAI fields sent at their "off" value; any other value of them is an
    error naming the field (as is any field OpenAI's API does not have, through extra="forbid")."""
    if isinstance(data, dict):
        for name in unsupported:
            if name in data:
                if data[name] not in off or data[name] is True:
                    raise PydanticCustomError("unsupported", "`{field}` is not supported by this gateway (docs/api.md)",
                                              {"field": name})
                data = {k: v for k, v in data.items() if k != name}
    return data


class ChatCompletionFields(BaseModel):
    """The request's fields without the check of OpenAI's unimplemented ones: pydantic validates it
    straight from the JSON bytes, while a model-level "before" validator makes it build a dict first
    (40% of the validation's time, docs/performance.md). Any field it does not know fails it, so a
    request it accepts is one the whole model accepts alike; the route validates with this first
    and, when that fails, with `ChatCompletionRequest`, whose errors are the answer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Stops = Field(default_factory=list, json_schema_extra={"default": []})  # not `= []`: that default is deep-copied per request
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)  # a 64-bit seed, as the engines take
    n: Literal[1] | None = None  # one choice per request
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)  # the end user, written to the request log

    @field_validator("stop", mode="before", json_schema_input_type=NonEmpty | Stops | None)
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [] if v is None else [v] if isinstance(v, str) else v


class ChatCompletionRequest(ChatCompletionFields):
    """The chat request as the API defines it: its fields, and OpenAI's unimplemented ones refused
    unless they are off."""

    @model_validator(mode="before")
    @classmethod
    def _unsupported_off(cls, data: object) -> object:
        return refuse_unsupported(data, UNSUPPORTED, OFF)


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str = Field(description='"stop" or "length" (an upstream engine may pass on others)')


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The answer to a request without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a stream; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
