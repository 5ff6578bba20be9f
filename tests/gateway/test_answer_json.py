"""The non-streamed answer's JSON is written from literals and serialised strings (serving.py
`_json`), not by dumping a dict: it must stay byte for byte what `json.dumps` of that dict gave,
for any text, model name and finish reason the engine or the client can put in it."""

from __future__ import annotations

import json

import pytest

from gateway.openai.chat_completion.serving import ChatServing, _Answer
from gateway.openai.completion.serving import CompletionServing
from gateway.ratelimit import Reservation

TEXTS = ["", " hello" * 16, 'quote " backslash \\ slash /', "line\nbreak\ttab\r\x00\x1f\x7f",
         "ünïcödé — 日本語 🙂", "\u2028\u2029", "</script>"]


def _answer(text: str, model: str, finish_reason: str | None) -> _Answer:
    answer = _Answer(ctx=None, tenant=None, model=model, prompt="p", started=0.0,  # type: ignore[arg-type]
                     reservation=Reservation(), id="chatcmpl-0123abcd", created=1_700_000_000,
                     prompt_tokens=16, completion_tokens=7)
    answer.parts = [text[: len(text) // 2], text[len(text) // 2:]]
    answer.finish_reason = finish_reason
    return answer


def _expected(serving: ChatServing, answer: _Answer, text: str) -> bytes:
    choice = ({"index": 0, "text": text, "logprobs": None, "finish_reason": answer.finish_reason}
              if isinstance(serving, CompletionServing) else
              {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": answer.finish_reason})
    body = {"id": answer.id, "object": serving.object, "created": answer.created, "model": answer.model,
            "choices": [choice], "usage": {"prompt_tokens": 16, "completion_tokens": 7, "total_tokens": 23}}
    return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


@pytest.mark.parametrize("serving_class", [ChatServing, CompletionServing])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("model,finish_reason", [("tiny", "stop"), ('we"ird/mödel\n', "length"), ("m", None),
                                                 ("m", "ünusual")])
def test_answer_bytes_are_json_dumps_of_the_answer(serving_class: type[ChatServing], text: str, model: str,
                                                    finish_reason: str | None) -> None:
    serving = serving_class(None)  # type: ignore[arg-type]  # _json reads only the answer
    answer = _answer(text, model, finish_reason)
    response = serving._json(answer, b"x-ratelimit-limit-requests: 10\r\n")
    assert response.body == _expected(serving, answer, text)
    assert json.loads(response.body)["choices"][0]["finish_reason"] == finish_reason
    assert response.headers.content_length == len(response.body)
    assert list(response.headers) == [(b"x-ratelimit-limit-requests", b"10"),
                                (b"content-length", str(len(response.body)).encode()),
                                (b"content-type", b"application/json")]
