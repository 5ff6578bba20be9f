"""Engine failures seen by a client: replicas (fake vLLM processes) killed or hung mid-request, timeouts,
recovery through the health loop, and the in-process engine failing or hanging. Whatever breaks, the
client gets an answer in bounded time: a retry on another replica, a 503 in OpenAI's error shape, or
a stream that ends with an error event. Never a hang."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.engines.base import GenerationRequest
from gateway.engines.local import LocalEngine
from gateway.settings import Settings
from tests.gateway.conftest import adapter_dirs, gateway_model_dir  # noqa: F401  (fixtures)
from tests.lifecycle.conftest import running
from tests.reliability.processes import Child, children, sse_lines, upstream

MODEL = "fake-model"
ERROR_KEYS = {"message", "type", "param", "code"}


def vllm_settings(tmp: Path, replicas: list[Child], **overrides: Any) -> Settings:
    """A gateway on `replicas`, open to any key, checking health every 0.2 s; hangs are noticed after
    1 s of silence (`request_timeout_s`)."""
    vllm = {"urls": [r.url for r in replicas], "health_interval_s": 0.2, "connect_timeout_s": 1.0,
            "request_timeout_s": 1.0, **overrides.pop("vllm", {})}
    return Settings(engine="vllm", model_name=MODEL, vllm=vllm, state_dir=tmp / "state", **overrides)


def chat(url: str, max_tokens: int = 8, stream: bool = False, timeout: float = 20) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout, headers={"Authorization": "Bearer any"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                            "stream": stream})


def assert_openai_error(response: httpx.Response, status: int = 503) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"] and error["type"] == "server_error"
    return error


def read_stream(url: str, max_tokens: int, after_events: int = 0, then: Callable[[], None] | None = None,
                **kwargs: Any) -> tuple[list[dict[str, Any]], bool, float]:
    """Stream an answer; after `after_events` content events run `then`. Returns the events, whether
    `[DONE]` came, and the seconds from `then` (or the start) to the end of the stream."""
    events: list[dict[str, Any]] = []
    done = False
    pending = then
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": "Bearer any"}, timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                            "stream": True, **kwargs}) as response:
        assert response.status_code == 200, response.read()
        for data in sse_lines(response):
            if data == "[DONE]":
                done = True
                continue
            events.append(json.loads(data))
            content = [e for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
            if pending is not None and len(content) == after_events:
                pending()
                pending, started = None, time.monotonic()
    return events, done, time.monotonic() - started


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz").status_code == 200


# --- replicas killed -----------------------------------------------------------------------------


def test_killed_replica_retry_then_503_then_recovery(tmp_path: Path) -> None:
    a, b = upstream(tmp_path, token_delay_ms=100).start(), upstream(tmp_path, token_delay_ms=100).start()
    with children(a, b):
        a.wait_ready("/health")
        b.wait_ready("/health")
        with running(vllm_settings(tmp_path, [a, b])) as gw:
            # A non-streamed request goes to the first idle replica (a); killed mid-answer, b answers it whole.
            answer: list[httpx.Response] = []
            worker = threading.Thread(target=lambda: answer.append(chat(gw.url, max_tokens=8)))
            worker.start()
            time.sleep(0.3)
            a.kill()
            worker.join(timeout=20)
            assert answer[0].status_code == 200, answer[0].text
            assert answer[0].json()["choices"][0]["message"]["content"] == " hello" * 8
            wait_until(lambda: not gw.ctx.engine._replicas[0].up, 5, "the killed replica was never marked down")

            b.kill()  # none left: a prompt 503 in OpenAI's shape, not a hang
            started = time.monotonic()
            error = assert_openai_error(chat(gw.url))
            assert time.monotonic() - started < 3 and error["code"] == "engine_unavailable"
            wait_until(lambda: not ready(gw.url), 5, "/readyz stayed 200 with every replica dead")

            revived = upstream(tmp_path, port=a.port)  # a comes back on its address
            with children(revived.start()):
                wait_until(lambda: ready(gw.url), 10, "the gateway did not notice the replicas coming back")
                assert chat(gw.url).status_code == 200
                assert chat(gw.url, stream=True).status_code == 200


def test_stream_cut_by_a_killed_replica_ends_with_an_error_event(tmp_path: Path) -> None:
    replica = upstream(tmp_path, token_delay_ms=100).start()
    with children(replica):
        replica.wait_ready("/health")
        with running(vllm_settings(tmp_path, [replica])) as gw:
            events, done, tail = read_stream(gw.url, max_tokens=30, after_events=3, then=replica.kill)
            assert not done and tail < 3
            assert set(events[-1]) == {"error"} and set(events[-1]["error"]) == ERROR_KEYS
            assert "failed mid-answer" in events[-1]["error"]["message"]
            assert text_of(events).startswith(" hello hello hello")


# --- replicas hung -------------------------------------------------------------------------------


def test_hung_replica_is_skipped_then_503_then_recovery(tmp_path: Path) -> None:
    a, b = upstream(tmp_path, token_delay_ms=20).start(), upstream(tmp_path, token_delay_ms=20).start()
    with children(a, b):
        a.wait_ready("/health")
        b.wait_ready("/health")
        with running(vllm_settings(tmp_path, [a, b])) as gw:
            a.signal(signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
            started = time.monotonic()
            response = chat(gw.url)
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 4  # at most request_timeout_s on a, then b
            b.signal(signal.SIGSTOP)
            started = time.monotonic()
            assert_openai_error(chat(gw.url, stream=True))
            assert time.monotonic() - started < 4
            a.signal(signal.SIGCONT)
            b.signal(signal.SIGCONT)
            wait_until(lambda: ready(gw.url) and all(r.up for r in gw.ctx.engine._replicas), 10,
                       "the replicas did not come back")
            assert chat(gw.url).status_code == 200


def test_stream_hung_mid_way_ends_with_an_error_event_within_the_read_timeout(tmp_path: Path) -> None:
    replica = upstream(tmp_path, token_delay_ms=50).start()
    with children(replica):
        replica.wait_ready("/health")
        with running(vllm_settings(tmp_path, [replica])) as gw:
            events, done, tail = read_stream(gw.url, max_tokens=40, after_events=2,
                                             then=lambda: replica.signal(signal.SIGSTOP))
            assert not done and 0.8 < tail < 2.5  # request_timeout_s is 1 s
            assert "request_timeout_s" in events[-1]["error"]["message"]
            replica.signal(signal.SIGCONT)


# --- first-token and total timeouts --------------------------------------------------------------


def test_no_first_token_in_time_is_a_503(tmp_path: Path) -> None:
    replica = upstream(tmp_path, token_delay_ms=1500).start()
    with children(replica):
        replica.wait_ready("/health")
        settings = vllm_settings(tmp_path, [replica], vllm={"request_timeout_s": 10}, timeouts={"first_token_s": 0.5})
        with running(settings) as gw:
            started = time.monotonic()
            error = assert_openai_error(chat(gw.url, stream=True))
            assert time.monotonic() - started < 1.5 and "first_token_s" in error["message"]


def test_an_answer_past_the_total_timeout_is_cut(tmp_path: Path) -> None:
    replica = upstream(tmp_path, token_delay_ms=200).start()
    with children(replica):
        replica.wait_ready("/health")
        settings = vllm_settings(tmp_path, [replica], vllm={"request_timeout_s": 10}, timeouts={"total_s": 1.5})
        with running(settings) as gw:
            started = time.monotonic()
            events, done, _ = read_stream(gw.url, max_tokens=20)  # 4 s of tokens
            assert not done and time.monotonic() - started < 2.5
            assert 3 <= text_of(events).count("hello") <= 8 and "total_s" in events[-1]["error"]["message"]
            started = time.monotonic()
            error = assert_openai_error(chat(gw.url, max_tokens=20))  # non-streamed: the whole answer is late
            assert time.monotonic() - started < 2.5 and "total_s" in error["message"]


# --- the in-process engine -----------------------------------------------------------------------


@pytest.fixture
def local_gw(tmp_path: Path, gateway_model_dir: Path):  # noqa: F811
    settings = Settings(model=str(gateway_model_dir), model_name=MODEL, state_dir=tmp_path / "state",
                        timeouts={"first_token_s": 1.0, "total_s": 30})
    with running(settings) as gw:
        yield gw


def test_local_generation_that_raises_gives_503_and_error_event(local_gw) -> None:
    engine = local_gw.ctx.engine
    forward, calls = engine._decoder._forward, {"made": 0, "fail_after": 6}

    def failing(*args: Any) -> Any:
        calls["made"] += 1
        if calls["made"] > calls["fail_after"]:
            raise RuntimeError("injected fault")
        return forward(*args)

    engine._decoder._forward = failing
    events, done, _ = read_stream(local_gw.url, max_tokens=20, temperature=0)  # fails after 5 tokens
    assert not done and text_of(events) and "injected fault" in events[-1]["error"]["message"]
    calls.update(made=0, fail_after=0)  # the prefill fails: nothing was sent yet
    error = assert_openai_error(chat(local_gw.url, max_tokens=20))
    assert "generation failed: injected fault" in error["message"]
    engine._decoder._forward = forward
    assert chat(local_gw.url, max_tokens=4).status_code == 200  # the engine goes on serving


def test_local_engine_that_hangs_gives_a_timely_503(local_gw) -> None:
    engine = local_gw.ctx.engine
    forward, release = engine._decoder._forward, threading.Event()

    def hanging(*args: Any) -> Any:
        release.wait(timeout=30)
        return forward(*args)

    engine._decoder._forward = hanging
    try:
        started = time.monotonic()
        error = assert_openai_error(chat(local_gw.url, max_tokens=4, stream=True))
        assert time.monotonic() - started < 2.5 and "first_token_s" in error["message"]
    finally:
        engine._decoder._forward = forward
        release.set()
    assert chat(local_gw.url, max_tokens=4).status_code == 200


def test_local_engine_loads_adapters_whatever_their_name(gateway_model_dir: Path, adapter_dirs: dict[str, Path],  # noqa: F811
                                                         ) -> None:
    """Names PEFT cannot take as module attributes (`half` is a torch method; a dot is a path) once
    failed every upload with "attribute 'half' already exists"."""

    async def main() -> None:
        engine = LocalEngine(str(gateway_model_dir), MODEL)
        await engine.start()
        try:
            answers = {}
            for name in ("half", "support.v2", "train"):
                await engine.load_adapter(name, adapter_dirs["alpha"])
                request = GenerationRequest([{"role": "user", "content": "hi"}], adapter=name, max_tokens=6,
                                            temperature=0)
                answers[name] = "".join([c.text async for c in engine.generate(request)])
            assert len(set(answers.values())) == 1 and answers["half"]
            await engine.unload_adapter("half")
            assert engine.adapters() == {"support.v2", "train"}
        finally:
            await engine.close()

    asyncio.run(main())
