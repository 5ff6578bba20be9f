"""Request limits, each answered with a clear OpenAI-format 4xx: body size (413, counted while the
body streams in, on every route), number of messages and max_tokens (400), open streams per tenant
(429, the slot freed when a stream ends, fails or its client leaves).

The gateway runs on the vLLM engine in front of a fake replica (tests/vllm/fake_vllm.py): no model
to load, and a prompt with "[hold]" keeps its stream open until the test lets it finish."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from starlette.types import Message

from gateway.settings import load_settings
from salora.errors import SaLoRAError
from tests.gateway.conftest import ADMIN_KEY, LiveGateway, gateway_model_dir, serve_app  # noqa: F401  (fixtures)
from tests.vllm.conftest import vllm_settings
from tests.vllm.fake_vllm import FakeServer, FakeVLLM

BODY_LIMIT, UPLOAD_LIMIT, MAX_MESSAGES, MAX_TOKENS, MAX_STREAMS = 20_000, 50_000, 3, 64, 2
CHUNK = 4096
FILE_PART = b'--x\r\nContent-Disposition: form-data; name="file"; filename="adapter.tgz"\r\n\r\n'


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.fixture(scope="module")
def replica() -> Iterator[FakeServer]:
    server = FakeServer(FakeVLLM()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(serve_app, tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path, replica: FakeServer) -> LiveGateway:
    limits = {"max_body_bytes": BODY_LIMIT, "max_messages": MAX_MESSAGES, "max_tokens": MAX_TOKENS,
              "default_max_tokens": 8, "max_concurrent_streams": MAX_STREAMS}
    settings = vllm_settings(tmp_path_factory.mktemp("limits-state"), gateway_model_dir, [replica], limits=limits,
                             lifecycle={"max_upload_bytes": UPLOAD_LIMIT})
    live = serve_app(settings)
    live.wait_ready()
    live.keys = {name: live.admin("POST", "/admin/tenants", json={"name": name}).json()["key"] for name in ("a", "b")}
    return live


def messages(n: int, text: str = "hello") -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(n)]


# --- body size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, auth", [
    ("/v1/chat/completions", "tenant"),
    ("/admin/tenants", None),  # FastAPI would read the whole body before the key check
    ("/admin/tenants", "admin"),
    ("/admin/adapters/x/force", None),
])
def test_body_over_the_limit_is_413_with_or_without_content_length(gw: LiveGateway, path: str, auth: str | None):
    headers = {"Authorization": f"Bearer {gw.keys['a'] if auth == 'tenant' else ADMIN_KEY}"} if auth else {}
    headers["Content-Type"] = "application/json"
    declared = httpx.post(f"{gw.url}{path}", content=b" " * (BODY_LIMIT + 1), headers=headers)
    chunked = httpx.post(f"{gw.url}{path}", content=iter([b" " * CHUNK] * (BODY_LIMIT // CHUNK + 2)), headers=headers)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert error_of(response)["code"] == "request_too_large" and str(BODY_LIMIT) in error_of(response)["message"]
    small = httpx.post(f"{gw.url}{path}", content=b" " * (BODY_LIMIT - 1), headers=headers)
    assert small.status_code in (400, 401)  # under the limit: read, then refused for what it is


@pytest.mark.parametrize("path, who, limit", [
    ("/v1/chat/completions", "tenant", BODY_LIMIT),
    ("/admin/tenants", None, BODY_LIMIT),
    ("/admin/adapters", "admin", UPLOAD_LIMIT),
])
def test_an_endless_body_is_cut_at_the_limit(gw: LiveGateway, path: str, who: str | None, limit: int):
    """The limit is enforced while reading: the app stops pulling just past it, never buffers the rest."""
    key = {"tenant": gw.keys["a"], "admin": ADMIN_KEY, None: None}[who]
    content_type = "multipart/form-data; boundary=x" if path == "/admin/adapters" else "application/json"
    answer, pulled = _drive(gw, path, key, content_type)
    assert answer["status"] == 413
    assert limit < pulled <= limit + 2 * CHUNK


def test_an_upload_without_the_admin_key_is_refused_before_its_body_is_read(gw: LiveGateway):
    answer, pulled = _drive(gw, "/admin/adapters", None, "multipart/form-data; boundary=x")
    assert answer["status"] == 401 and pulled == 0


def _drive(gw: LiveGateway, path: str, key: str | None, content_type: str) -> tuple[dict, int]:
    pulled, answer, body = 0, {}, bytearray()

    async def receive() -> Message:
        nonlocal pulled
        # a multipart body opens a file part first, so the parser reads on instead of refusing the form
        chunk = FILE_PART if pulled == 0 and content_type.startswith("multipart/") else b" " * CHUNK
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    headers = [(b"content-type", content_type.encode())]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": gw.app, "state": {}}
    asyncio.run(asyncio.wait_for(gw.app(scope, receive, send), timeout=30))
    assert b'"error"' in body
    return answer, pulled


# --- messages and max_tokens ----------------------------------------------------------------------


def test_too_many_messages_is_400(gw: LiveGateway):
    client = gw.client(gw.keys["a"])
    ok = client.chat.completions.create(model="base", messages=messages(MAX_MESSAGES), max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=messages(MAX_MESSAGES + 1), max_tokens=4)
    assert e.value.code == "too_many_messages" and e.value.param == "messages"
    assert f"at most {MAX_MESSAGES}" in e.value.message


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_limit_is_400(gw: LiveGateway, field: str):
    client = gw.client(gw.keys["a"])
    assert client.chat.completions.create(model="base", messages=messages(1), **{field: MAX_TOKENS}).usage
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=messages(1), **{field: MAX_TOKENS + 1})
    assert e.value.code == "max_tokens_exceeded" and e.value.param == field
    assert f"at most {MAX_TOKENS}" in e.value.message


# --- concurrent streams ---------------------------------------------------------------------------


def open_stream(gw: LiveGateway, tenant: str) -> openai.Stream:
    """A stream held open by the fake replica (its first chunk already read)."""
    stream = gw.client(gw.keys[tenant]).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "[hold] tell me more"}], stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    return stream


def wait_open(gw: LiveGateway, tenant: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while gw.ctx.streams.open(tenant) != count:
        assert time.monotonic() < deadline, f"{tenant} has {gw.ctx.streams.open(tenant)} streams open, not {count}"
        time.sleep(0.02)


def test_concurrent_streams_per_tenant_are_capped_and_released(gw: LiveGateway, replica: FakeServer):
    replica.fake.hold.clear()
    try:
        held = [open_stream(gw, "a") for _ in range(MAX_STREAMS)]
        wait_open(gw, "a", MAX_STREAMS)
        with pytest.raises(openai.RateLimitError) as e:
            open_stream(gw, "a")
        assert e.value.code == "concurrent_streams_exceeded" and e.value.type == "streams"
        assert e.value.response.headers["retry-after"] == "1" and str(MAX_STREAMS) in e.value.message
        # the cap is per tenant and per stream: another tenant streams, and "a" still gets plain answers
        other = open_stream(gw, "b")
        plain = gw.client(gw.keys["a"]).chat.completions.create(model="base", messages=messages(1), max_tokens=4)
        assert plain.choices[0].message.content

        held.pop().close()  # the client leaves mid-stream: its slot comes back
        wait_open(gw, "a", MAX_STREAMS - 1)
        held.append(open_stream(gw, "a"))
        wait_open(gw, "a", MAX_STREAMS)
    finally:
        replica.fake.hold.set()
    for stream in [*held, other]:  # streams that finish normally release their slots too
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    wait_open(gw, "a", 0)
    wait_open(gw, "b", 0)


def test_a_failed_stream_releases_its_slot(gw: LiveGateway, replica: FakeServer):
    for _ in range(MAX_STREAMS + 1):
        replica.fake.fail_chat.append(400)  # the upstream refuses: the stream never starts
        with pytest.raises(openai.BadRequestError):
            open_stream(gw, "a")
    wait_open(gw, "a", 0)
    stream = open_stream(gw, "a")
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_default_above_the_maximum_is_a_settings_error():
    with pytest.raises(SaLoRAError, match="default_max_tokens"):
        load_settings(limits={"max_tokens": 64, "default_max_tokens": 256})
