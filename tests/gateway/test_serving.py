"""The serving path under load and at its edges: concurrent requests on different adapters share
forward passes and still equal their sequential answers; a client that leaves stops its generation;
metrics carry bounded labels; the judge classifies every answer after it has been sent."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import gateway_settings

PROMPTS = ("Tell me a story about a cat.", "What is the capital of France?")


def sample(gw, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (0 when absent)."""
    for family in text_string_to_metric_families(gw.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_concurrent_requests_across_adapters_are_batched_and_exact(gw, keys):
    jobs = [(model, prompt) for model in ("tiny", "alpha", "beta") for prompt in PROMPTS]
    sequential = [gw.chat(keys["root"], m, p, max_tokens=24).choices[0].message.content for m, p in jobs]
    steps, small = sample(gw, "salora_engine_batch_size_count"), sample(gw, "salora_engine_batch_size_bucket", le="2.0")
    clients, start = [gw.client(keys["root"]) for _ in jobs], threading.Barrier(len(jobs))

    def ask(i: int) -> str:
        model, prompt = jobs[i]
        start.wait()  # all at once, so they overlap in the engine
        response = clients[i].chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
        return response.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(ask, range(len(jobs))))
    assert concurrent == sequential
    steps_with_more_rows = (sample(gw, "salora_engine_batch_size_count") - steps) - (
        sample(gw, "salora_engine_batch_size_bucket", le="2.0") - small)
    assert steps_with_more_rows > 0  # some decode steps ran 3 or more requests (adapters mixed) at once


def idle_after(gw, seconds: float = 0.4) -> bool:
    """No decode step runs for `seconds`: the worker has nothing left to generate."""
    before = sample(gw, "salora_engine_batch_size_count")
    time.sleep(seconds)
    return sample(gw, "salora_engine_batch_size_count") == before


def test_client_leaving_a_stream_stops_its_generation(gw, keys):
    left = sample(gw, "salora_requests_total", tenant="acme", adapter="alpha", status="499")
    body = {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 512,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {keys['acme']}"}) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few events, then hang up
    wait_for(lambda: sample(gw, "salora_requests_total", tenant="acme", adapter="alpha", status="499") == left + 1)
    assert idle_after(gw)  # 500 more tokens would take seconds; the worker stopped at once
    assert gw.chat(keys["acme"], "alpha", PROMPTS[0], max_tokens=4).usage.completion_tokens == 4


def test_client_leaving_a_plain_request_stops_its_generation(gw, keys):
    left = sample(gw, "salora_requests_total", tenant="globex", adapter="beta", status="499")
    with pytest.raises(openai.APITimeoutError):
        gw.client(keys["globex"], timeout=0.3).chat.completions.create(
            model="beta", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=512, temperature=0)
    wait_for(lambda: sample(gw, "salora_requests_total", tenant="globex", adapter="beta", status="499") == left + 1)
    assert idle_after(gw)


def test_metrics_count_requests_tokens_and_latency_with_bounded_labels(gw, keys):
    ok = sample(gw, "salora_requests_total", tenant="acme", adapter="alpha", status="200")
    completion = sample(gw, "salora_tokens_total", tenant="acme", adapter="alpha", kind="completion")
    durations = sample(gw, "salora_request_duration_seconds_count", adapter="alpha")
    r = gw.chat(keys["acme"], "alpha", PROMPTS[1], max_tokens=7)
    with pytest.raises(openai.NotFoundError):
        gw.chat(keys["acme"], "made-up-model-name", PROMPTS[1])
    with pytest.raises(openai.AuthenticationError):
        gw.chat("sk-salora-wrong", "alpha", PROMPTS[1])
    wait_for(lambda: sample(gw, "salora_requests_total", tenant="acme", adapter="alpha", status="200") == ok + 1)
    assert sample(gw, "salora_tokens_total", tenant="acme", adapter="alpha", kind="completion") == completion + 7
    assert sample(gw, "salora_tokens_total", tenant="acme", adapter="alpha", kind="prompt") >= r.usage.prompt_tokens
    assert sample(gw, "salora_request_duration_seconds_count", adapter="alpha") == durations + 1
    assert sample(gw, "salora_time_to_first_token_seconds_count", adapter="alpha") >= 1
    assert sample(gw, "salora_requests_total", tenant="acme", adapter="other", status="404") >= 1
    assert sample(gw, "salora_requests_total", tenant="other", adapter="other", status="401") >= 1
    text = gw.metrics()
    assert "made-up-model-name" not in text and "sk-salora-wrong" not in text
    assert sample(gw, "salora_adapters", state="live") == 2


@pytest.mark.parametrize("stream", [False, True])
def test_judge_classifies_each_answer_after_it_is_sent(gw, keys, judge, stream):
    refused = sample(gw, "salora_responses_total", tenant="globex", adapter="beta", refused="true")
    kept = sample(gw, "salora_responses_total", tenant="globex", adapter="beta", refused="false")
    client = gw.client(keys["globex"])

    def ask(prompt: str) -> tuple[str, float]:
        response = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=8, temperature=0, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in response if c.choices) if stream else response.choices[0].message.content
        return text, time.monotonic()

    started = time.monotonic()
    slow_prompt = f"[refuse] [slow judge] {stream}"
    slow_answer, answered = ask(slow_prompt)
    assert answered - started < 0.9  # the judge sleeps 1 s on this prompt; the caller did not wait for it
    plain_answer, answered_again = ask("a plain question")
    assert answered_again - started < 0.9  # nor did the next request on the same connection
    wait_for(lambda: sample(gw, "salora_responses_total", tenant="globex", adapter="beta", refused="true") == refused + 1)
    assert sample(gw, "salora_responses_total", tenant="globex", adapter="beta", refused="false") == kept + 1
    seen = {prompt: (response, at) for prompt, response, at in judge.seen}
    assert seen[slow_prompt][0] == slow_answer and seen["a plain question"][0] == plain_answer
    assert seen[slow_prompt][1] > answered  # judged after the answer reached the client


def test_adapters_load_and_unload_at_runtime(serve_app, tmp_path, gateway_model_dir, adapter_dirs):
    live = serve_app(gateway_settings(tmp_path, gateway_model_dir, {}, admin_key=None))  # open: all adapters
    live.wait_ready()
    engine = live.ctx.engine
    base = live.chat("any", "tiny", PROMPTS[0], max_tokens=12).choices[0].message.content
    asyncio.run(engine.load_adapter("gamma", adapter_dirs["alpha"]))
    assert [m.id for m in live.client("any").models.list().data] == ["tiny"]  # loaded, but not live: not routable
    live.ctx.lifecycle.live |= {"gamma"}  # this test drives the engine directly, so it declares it live itself
    assert [m.id for m in live.client("any").models.list().data] == ["tiny", "gamma"]
    assert live.chat("any", "gamma", PROMPTS[0], max_tokens=12).choices[0].message.content != base
    with pytest.raises(ValueError, match="already loaded"):
        asyncio.run(engine.load_adapter("gamma", adapter_dirs["beta"]))

    stream = live.client("any").chat.completions.create(
        model="gamma", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=512, temperature=0, stream=True)
    with pytest.raises(openai.APIError, match="unloaded"):
        for i, _ in enumerate(stream):
            if i == 3:
                asyncio.run(engine.unload_adapter("gamma"))  # rows on it end with an error event
    with pytest.raises(openai.NotFoundError):
        live.chat("any", "gamma", PROMPTS[0], max_tokens=2)
    assert live.chat("any", "tiny", PROMPTS[0], max_tokens=12).choices[0].message.content == base
