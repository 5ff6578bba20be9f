"""Every error the API promises, in OpenAI's body shape and status code, seen through the official
client (which maps status codes to its exception classes) and raw HTTP."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest

from gateway.openai.chat_completion.serving import prompt_token_bound
from tests.gateway.conftest import gateway_settings

PROMPT = "Hello there"


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_or_missing_key_is_401(gw, keys):
    with pytest.raises(openai.AuthenticationError) as e:
        gw.chat("sk-salora-not-a-key", "tiny", PROMPT)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gw.client("sk-salora-not-a-key").models.list()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"


def test_unknown_model_is_404(gw, keys):
    with pytest.raises(openai.NotFoundError) as e:
        gw.chat(keys["root"], "no-such-adapter", PROMPT)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    r = httpx.get(f"{gw.url}/v1/no-such-route")
    assert r.status_code == 404 and error_of(r)["message"]


@pytest.mark.parametrize("params, param", [
    ({"n": 2}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),  # above limits.max_tokens
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"model": None}, "model"),
])
def test_invalid_request_is_400(gw, keys, params, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], **params}
    with pytest.raises(openai.BadRequestError) as e:
        gw.client(keys["root"]).chat.completions.create(**request)
    assert e.value.param == param and e.value.type == "invalid_request_error"


def test_malformed_json_is_400(gw, keys):
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"Authorization": f"Bearer {keys['root']}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]


def test_prompt_longer_than_the_context_is_400(gw, keys):
    with pytest.raises(openai.BadRequestError) as e:
        gw.chat(keys["root"], "tiny", "cat " * 1100)  # the tiny model's context is 1024 tokens
    assert e.value.code == "context_length_exceeded"


def test_body_over_the_limit_is_413(gw, keys):
    with pytest.raises(openai.APIStatusError) as e:
        gw.chat(keys["root"], "tiny", "x" * 30_000)  # limits.max_body_bytes is 20,000
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    chunked = httpx.post(f"{gw.url}/v1/chat/completions", content=iter([b"x" * 15_000, b"x" * 15_000]),
                         headers={"Authorization": f"Bearer {keys['root']}"})  # no Content-Length
    assert chunked.status_code == 413


def test_rate_limit_429_then_recovery(gw, keys):
    client = gw.client(keys["metered"])  # 2 requests per 2-second window
    for _ in range(2):
        gw.chat(keys["metered"], "tiny", PROMPT, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=2)
    retry_after = int(e.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 2 and e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
    time.sleep(retry_after)
    assert gw.chat(keys["metered"], "tiny", PROMPT, max_tokens=2).choices[0].message.content is not None


def test_tokens_per_minute_limit_reserves_then_settles(gw):
    """tpm reserves the prompt's upper bound plus max_tokens at admission: a request that could never
    fit is refused at once, one that fits leaves exactly its real usage charged, and the next is
    refused until the window has room."""
    created = gw.admin("POST", "/admin/tenants", json={"name": "tpm-limited", "tpm": 200})
    key = created.json()["key"]
    with pytest.raises(openai.RateLimitError) as e:
        gw.chat(key, "tiny", PROMPT, max_tokens=190)  # 190 + the prompt's bound > 200
    assert e.value.type == "tokens" and "Request too large" in e.value.message and "retry-after" not in e.value.response.headers
    first = gw.client(key).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0)
    usage = first.parse().usage
    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    time.sleep(0.2)  # the charge is settled after the last byte (the refusal below shows it settled)
    with pytest.raises(openai.RateLimitError) as e:
        bound = prompt_token_bound([{"role": "user", "content": PROMPT}])
        gw.chat(key, "tiny", PROMPT, max_tokens=200 - bound)  # fits an empty window, not what is left of this one
    assert e.value.type == "tokens" and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.response.headers["x-ratelimit-remaining-tokens"] == str(200 - usage.total_tokens)


@pytest.fixture(scope="module")
def broken(serve_app, tmp_path_factory, gateway_model_dir):
    """A gateway whose model directory has a config but unreadable weights: it starts, never gets ready."""
    model = tmp_path_factory.mktemp("broken-model")
    shutil.copy(gateway_model_dir / "config.json", model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    live = serve_app(gateway_settings(tmp_path_factory.mktemp("broken-state"), model, {}))
    deadline = time.monotonic() + 30
    while httpx.get(f"{live.url}/readyz").json()["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return live


def test_engine_unavailable_is_503(broken):
    assert httpx.get(f"{broken.url}/healthz").status_code == 200
    ready = httpx.get(f"{broken.url}/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "failed" and "cannot load" in ready.json()["error"]
    key = broken.admin("POST", "/admin/tenants", json={"name": "t"}).json()["key"]
    with pytest.raises(openai.InternalServerError) as e:
        broken.chat(key, "tiny", PROMPT)
    assert e.value.status_code == 503 and e.value.code == "engine_unavailable"
    assert 'salora_engine_errors_total{engine="local",kind="load"} 1.0' in broken.metrics()
