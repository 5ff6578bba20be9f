"""The OpenAI surface: every request field is honoured or refused naming it, never ignored; the
headers OpenAI's clients read (`x-request-id`, `x-ratelimit-*`) are on the answers; the request log."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import openai
import pytest

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

from gateway.openai.chat_completion.protocol import UNSUPPORTED
from tests.gateway.conftest import gateway_settings

CHAT = "/v1/chat/completions"
BASE_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}
# A value of each unimplemented field that asks for something (as opposed to its "off" value).
ASKING = {"logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_object"},
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required",
          "parallel_tool_calls": True, "functions": [{"name": "f"}], "function_call": "auto", "frequency_penalty": 0.5,
          "presence_penalty": -1.0, "logit_bias": {"50256": -100}, "audio": {"voice": "x"}, "modalities": ["audio"],
          "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high",
          "web_search_options": {"search_context_size": "low"}, "service_tier": "flex", "store": True,
          "metadata": {"k": "v"}, "verbosity": "low", "prompt_cache_key": "k", "safety_identifier": "s"}


def post(gw, key: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{gw.url}{CHAT}", json=body, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      timeout=60)


def test_every_unsupported_field_is_listed():
    assert set(ASKING) == set(UNSUPPORTED)


@pytest.mark.parametrize("field", sorted(ASKING))
def test_a_field_the_gateway_does_not_implement_is_refused_naming_it(gw, keys, field):
    response = post(gw, keys["root"], {**BASE_BODY, field: ASKING[field]})
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"]) == (400, field, "unsupported_parameter"), error


@pytest.mark.parametrize(("field", "off"), [("logprobs", False), ("tools", []), ("frequency_penalty", 0),
                                            ("presence_penalty", 0.0), ("logit_bias", {}), ("response_format", None)])
def test_an_unimplemented_field_at_its_off_value_is_accepted(gw, keys, field, off):
    plain = post(gw, keys["root"], BASE_BODY).json()["choices"][0]["message"]["content"]
    response = post(gw, keys["root"], {**BASE_BODY, field: off})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == plain


@pytest.mark.parametrize("body", [{**BASE_BODY, "top_k": 5}, {**BASE_BODY, "repetition_penalty": 1.1},
                                  {**BASE_BODY, "messages": [{"role": "user", "content": "x", "name": "bob"}]},
                                  {**BASE_BODY, "stream": True, "stream_options": {"include_usage": True, "x": 1}}])
def test_an_argument_openai_does_not_have_is_refused(gw, keys, body):
    response = post(gw, keys["root"], body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "unsupported_parameter"
    assert error["message"].startswith("Unrecognized request argument supplied")


def test_n_above_one_is_refused_naming_it(gw, keys):
    with pytest.raises(openai.BadRequestError) as e:
        gw.client(keys["root"]).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.param == "n"


def test_every_answer_has_a_request_id(gw, keys):
    ids = []
    for response in (post(gw, keys["root"], BASE_BODY), post(gw, keys["root"], {**BASE_BODY, "model": "nope"}),
                     httpx.get(f"{gw.url}/healthz"), post(gw, "sk-salora-wrong", BASE_BODY)):
        ids.append(response.headers["x-request-id"])
    assert len(set(ids)) == 4 and all(i.startswith("req_") for i in ids)
    kept = post(gw, keys["root"], BASE_BODY, {"x-request-id": "client-42"})
    assert kept.headers["x-request-id"] == "client-42"
    replaced = post(gw, keys["root"], BASE_BODY, {"x-request-id": "bad id\t" + "x" * 300})
    assert replaced.headers["x-request-id"].startswith("req_")


def test_rate_limit_headers_for_a_limited_tenant(gw, keys):
    created = gw.admin("POST", "/admin/tenants", json={"name": "headers", "rpm": 5, "tpm": 5000}).json()
    first = post(gw, created["key"], BASE_BODY)
    second = post(gw, created["key"], BASE_BODY)
    assert first.headers["x-ratelimit-limit-requests"] == "5" and first.headers["x-ratelimit-limit-tokens"] == "5000"
    assert (first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]) == ("4", "3")
    assert int(second.headers["x-ratelimit-remaining-tokens"]) < int(first.headers["x-ratelimit-remaining-tokens"])
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-requests" not in post(gw, keys["root"], BASE_BODY).headers  # no limits, no headers


def _raw_exchange(gw, key: str, connection: str, count: int) -> list[bytes]:
    """`count` chat requests on one socket, as the bytes of each answer (head and body)."""
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps(BASE_BODY).encode()
    request = (f"POST {CHAT} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\ncontent-type: "
               f"application/json\r\nconnection: {connection}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    answers = []
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        for _ in range(count):
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += _received(sock)
            head = data.split(b"\r\n\r\n", 1)[0]
            length = int(next(v for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n")[1:])
                              if k == b"content-length"))
            while len(data) < len(head) + 4 + length:
                data += _received(sock)
            answers.append(data)
        if connection == "close":
            assert sock.recv(1) == b"", "the server kept a connection the client asked to close"
    return answers


def _received(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the server closed the connection mid-answer"
    return data


def test_the_answers_head_on_the_wire_is_valid_http(gw, keys):
    """The JSON answer's headers are written as prepared lines (gateway/response_head.py), past
    uvicorn's per-header checks: on the wire they must still pass those checks, declare the body's
    exact length once, keep the connection open when asked, and close it when asked."""
    key = gw.admin("POST", "/admin/tenants", json={"name": "wire", "rpm": 50, "tpm": 50000}).json()["key"]
    for connection, count in (("keep-alive", 2), ("close", 1)):
        for answer in _raw_exchange(gw, key, connection, count):
            head, body = answer.split(b"\r\n\r\n", 1)
            status, *lines = head.split(b"\r\n")
            assert status == b"HTTP/1.1 200 OK"
            fields = [line.partition(b": ") for line in lines]
            for name, sep, value in fields:
                assert sep and not HEADER_RE.search(name) and not HEADER_VALUE_RE.search(value), (name, value)
            names = [name.lower() for name, _, _ in fields]
            assert len(names) == len(set(names)), names  # no header twice
            values = {name.lower(): value for name, _, value in fields}
            assert int(values[b"content-length"]) == len(body) and json.loads(body)["object"] == "chat.completion"
            assert values[b"content-type"] == b"application/json" and values[b"x-request-id"].startswith(b"req_")
            assert values[b"x-ratelimit-limit-requests"] == b"50" and b"date" in values and b"server" in values
            assert (values.get(b"connection") == b"close") == (connection == "close")


def test_the_request_log_has_one_line_per_request(serve_app, tmp_path, gateway_model_dir, caplog):
    live = serve_app(gateway_settings(tmp_path, gateway_model_dir, {}, request_log="json"))
    live.wait_ready()
    key = live.admin("POST", "/admin/tenants", json={"name": "logged"}).json()["key"]
    with caplog.at_level(logging.INFO, logger="gateway.requests"):
        ok = post(live, key, {**BASE_BODY, "user": "end-user-7"}, {"x-request-id": "trace-1"})
        missing = post(live, key, {**BASE_BODY, "model": "nope"}, {"x-request-id": "trace-2"})
        deadline = time.monotonic() + 10  # a completed answer is logged after its last byte is sent
        while True:
            lines = {(line := json.loads(r.getMessage()))["request_id"]: line
                     for r in caplog.records if r.name == "gateway.requests"}
            if {"trace-1", "trace-2"} <= set(lines) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert ok.status_code == 200 and missing.status_code == 404
    assert lines["trace-1"]["status"] == "200" and lines["trace-1"]["user"] == "end-user-7"
    assert lines["trace-1"]["completion_tokens"] == ok.json()["usage"]["completion_tokens"]
    assert lines["trace-1"]["tenant"] == "logged" and lines["trace-1"]["latency_ms"] > 0
    assert lines["trace-2"]["status"] == "404"


# --- the legacy completions API ---------------------------------------------------------------------

def test_legacy_completions_stream_and_not(gw, keys):
    client = gw.client(keys["root"])
    plain = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    assert plain.choices[0].text == streamed and plain.choices[0].finish_reason == "length"
    assert chunks[-1].usage == plain.usage and plain.usage.completion_tokens == 6
    tokenizer = gw.ctx.engine._decoder.tokenizer
    assert plain.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))  # no chat template around it
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Once upon a time"}],
                                          max_tokens=6, temperature=0)
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens


def test_legacy_completions_keep_tenants_and_fields(gw, keys):
    def post_completion(key: str, body: dict) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    body = {"model": "beta", "prompt": "Hello", "max_tokens": 2}
    assert post_completion(keys["acme"], body).status_code == 404  # acme may call alpha only
    assert post_completion("sk-salora-wrong", body).status_code == 401
    for field, value in (("echo", True), ("logprobs", 2), ("suffix", "x"), ("best_of", 2)):
        error = post_completion(keys["root"], {**body, field: value}).json()["error"]
        assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    assert post_completion(keys["root"], {**body, "best_of": 1, "echo": False}).status_code == 200
    assert post_completion(keys["root"], {**body, "prompt": ["a", "b"]}).status_code == 400  # one prompt a request
