"""The subset of OpenAI's chat completion API the gateway serves. Unknown request fields are ignored
(clients send many optional ones); known fields with values it cannot honour are a 400. Fields are
strict (no "5" for 5, no 1 for true), as in OpenAI's API, so the published schema is exactly what is
accepted. The response models document what the route writes (it builds its JSON by hand on the hot
path) and give /openapi.json its schemas (gateway/openapi.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NonEmpty = Annotated[str, Field(min_length=1)]
Stops = Annotated[list[NonEmpty], Field(max_length=4)]
INT64 = 1 << 63


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """The plain {role, content} the chat template takes; `developer` is OpenAI's new `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Stops = []
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)  # a 64-bit seed, as the engines take
    n: Literal[1] | None = None  # one choice per request
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before", json_schema_input_type=NonEmpty | Stops | None)
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [] if v is None else [v] if isinstance(v, str) else v


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
