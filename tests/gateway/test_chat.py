"""Chat completions over real HTTP with the official client: answers, streaming, sampling controls,
and model listing per tenant."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPT = "Tell me a story about a cat."


def test_chat_answers_with_usage(gw, keys):
    r = gw.chat(keys["root"], "tiny", PROMPT, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_each_adapter_answers_differently(gw, keys):
    answers = {m: gw.chat(keys["root"], m, PROMPT, max_tokens=12).choices[0].message.content for m in ("tiny", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers


@pytest.mark.parametrize("model", ["tiny", "alpha"])
def test_streamed_answer_equals_non_streamed(gw, keys, model):
    plain = gw.chat(keys["root"], model, PROMPT, max_tokens=40)
    stream = gw.client(keys["root"]).chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain.choices[0].message.content
    assert len(deltas) > 10  # token by token, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_event_stream_ends_with_done(gw, keys):
    body = {"model": "beta", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {keys['root']}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2].removeprefix("data: "))  # no usage unless asked


def test_max_tokens_spellings_and_default(gw, keys):
    a = gw.chat(keys["root"], "tiny", PROMPT, max_tokens=5)
    b = gw.chat(keys["root"], "tiny", PROMPT, max_completion_tokens=5)
    default = gw.chat(keys["root"], "tiny", PROMPT)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens == 5
    assert default.usage.completion_tokens == 16  # limits.default_max_tokens in the test settings


def test_stop_string_ends_the_answer_before_it(gw, keys):
    full = gw.chat(keys["root"], "alpha", PROMPT, max_tokens=30).choices[0].message.content
    stop = full[10:14]
    expected = full[: full.index(stop)]
    cut = gw.chat(keys["root"], "alpha", PROMPT, max_tokens=30, stop=[stop, "never-seen-xyz"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    stream = gw.client(keys["root"]).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": PROMPT}], max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_seed_reproduces_sampling(gw, keys):
    def sample(seed: int, **kwargs: object) -> str:
        kwargs.setdefault("temperature", 1.0)
        return gw.chat(keys["root"], "tiny", PROMPT, max_tokens=8, seed=seed, **kwargs).choices[0].message.content

    assert sample(7) == sample(7) and sample(7) != sample(8)
    assert sample(7, top_p=0.9) == sample(7, top_p=0.9)
    assert sample(7, temperature=0.0) == gw.chat(keys["root"], "tiny", PROMPT, max_tokens=8).choices[0].message.content


def test_models_listed_are_those_the_tenant_may_call(gw, keys):
    def ids(tenant: str) -> list[str]:
        return [m.id for m in gw.client(keys[tenant]).models.list().data]

    assert ids("acme") == ["tiny", "alpha"]
    assert ids("globex") == ["tiny", "beta"]
    assert ids("root") == ["tiny", "alpha", "beta"]
    assert gw.client(keys["acme"]).models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        gw.client(keys["acme"]).models.retrieve("beta")


def test_tenant_cannot_call_another_tenants_adapter(gw, keys):
    assert gw.chat(keys["globex"], "beta", PROMPT, max_tokens=3).choices[0].message.content
    with pytest.raises(openai.NotFoundError) as e:
        gw.chat(keys["acme"], "beta", PROMPT, max_tokens=3)
    assert e.value.code == "model_not_found" and "beta" in e.value.message
