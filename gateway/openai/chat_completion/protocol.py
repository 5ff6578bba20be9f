"""The subset of OpenAI's chat completion request the gateway serves. Unknown fields are ignored (as
clients send many optional ones); known fields with values it cannot honour are a 400."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """The plain {role, content} the chat template takes; `developer` is OpenAI's new `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = Field(default=(), max_length=4)
    seed: int | None = None
    n: Literal[1] | None = None  # one choice per request
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return () if v is None else (v,) if isinstance(v, str) else v
