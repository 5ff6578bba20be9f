"""Graceful shutdown of a real `salora serve` process (on the vLLM engine, in front of a fake upstream
whose tokens come 100 ms apart): after SIGTERM, /readyz is unready and new requests get a 503 at once,
streams in flight finish, and the process exits; what outlives `shutdown_timeout_s` is cut with an error."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.processes import Child, children, gateway, sse_lines, upstream

MODEL = "fake-model"
HEADERS = {"Authorization": "Bearer any"}


def start(tmp_path: Path, shutdown_timeout_s: float) -> tuple[Child, Child]:
    replica = upstream(tmp_path, token_delay_ms=100, tokens=100).start()
    gw = gateway(tmp_path, {"engine": "vllm", "model_name": MODEL, "state_dir": str(tmp_path / "state"),
                            "vllm": {"urls": [replica.url], "health_interval_s": 0.5},
                            "shutdown_timeout_s": shutdown_timeout_s})
    replica.wait_ready("/health")
    gw.start().wait_ready("/readyz")
    return replica, gw


def body(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


def stream_and_terminate(gw: Child, max_tokens: int, during: list[Any]) -> tuple[list[str], float]:
    """Stream an answer; after its second token send the gateway SIGTERM and at once record, in
    `during`, what /readyz, /healthz and a new chat request answer. Returns the stream's `data:`
    payloads and the time SIGTERM was sent."""
    payloads: list[str] = []
    terminated = 0.0
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body(max_tokens, True), headers=HEADERS,
                      timeout=30) as response:
        assert response.status_code == 200
        for data in sse_lines(response):
            payloads.append(data)
            if len(payloads) == 3:  # the role event and two tokens
                gw.signal(signal.SIGTERM)
                terminated = time.monotonic()
                during.append(httpx.get(f"{gw.url}/readyz"))
                during.append(httpx.get(f"{gw.url}/healthz"))
                during.append(httpx.post(f"{gw.url}/v1/chat/completions", json=body(4, False), headers=HEADERS))
    return payloads, terminated


def test_sigterm_lets_a_stream_finish_and_refuses_new_work(tmp_path: Path) -> None:
    replica, gw = start(tmp_path, shutdown_timeout_s=10)
    with children(gw, replica):
        during: list[httpx.Response] = []
        payloads, terminated = stream_and_terminate(gw, 20, during)  # 2 s of tokens
        readyz, healthz, chat = during
        assert readyz.status_code == 503 and readyz.json() == {"status": "draining"}
        assert healthz.status_code == 200
        assert chat.status_code == 503 and chat.headers["connection"] == "close"
        assert chat.json() == {"error": {"message": "The gateway is shutting down; retry on another instance.",
                                         "type": "server_error", "param": None, "code": "shutting_down"}}
        assert payloads[-1] == "[DONE]"
        text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1]
                       if json.loads(p)["choices"])
        assert text == " hello" * 20
        assert gw.wait_exit(timeout=10) == 0
        assert time.monotonic() - terminated < 8  # the stream's 2 s, then the exit: inside the 10 s (slack for a loaded CI)
        assert "drained" in gw.log.read_text()


def test_requests_outliving_the_deadline_are_cut_with_an_error(tmp_path: Path) -> None:
    replica, gw = start(tmp_path, shutdown_timeout_s=1.5)
    with children(gw, replica):
        whole: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: whole.append(httpx.post(
            f"{gw.url}/v1/chat/completions", json=body(60, False), headers=HEADERS, timeout=30)))
        waiting.start()  # a non-streamed answer of 6 s
        payloads, terminated = stream_and_terminate(gw, 60, [])  # a stream of 6 s
        cut = time.monotonic() - terminated
        waiting.join(timeout=10)
        assert 1.4 < cut < 3.5
        assert payloads[-1] != "[DONE]" and json.loads(payloads[-1])["error"]["code"] == "shutting_down"
        assert whole[0].status_code == 503 and whole[0].json()["error"]["code"] == "shutting_down"
        assert gw.wait_exit(timeout=10) == 0
        assert time.monotonic() - terminated < 1.5 + 8  # the deadline, then the exit (slack for a loaded CI)
