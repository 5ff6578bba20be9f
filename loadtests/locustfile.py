"""Locust users for the gateway (or any OpenAI-compatible server), for those who prefer Locust's
UI and distributed workers to `python -m loadtests.loadgen`.

Self-contained (it imports nothing from this project), so it runs with Locust installed anywhere,
e.g. `pip install -e '.[load]'` or a separate venv. Settings come from the environment:
LOADTEST_MODEL (default fake-model), OPENAI_API_KEY, LOADTEST_STREAM=1 for streaming,
LOADTEST_MAX_TOKENS (default 16). A streamed request also reports its time to first token as a
separate `TTFT` entry.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 100 -r 50 -t 1m
"""

from __future__ import annotations

import os
import time

from locust import FastHttpUser, task

MODEL = os.environ.get("LOADTEST_MODEL", "fake-model")
STREAM = os.environ.get("LOADTEST_STREAM", "") not in ("", "0", "false")
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "16"))
HEADERS = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}"}


class ChatUser(FastHttpUser):
    """Sends chat completions back to back (closed loop: one in flight per user)."""

    @task
    def chat(self) -> None:
        body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                                   "max_tokens": MAX_TOKENS, "temperature": 0}
        if not STREAM:
            with self.client.post("/v1/chat/completions", json=body, headers=HEADERS, catch_response=True) as r:
                if r.status_code != 200 or not r.text or '"choices"' not in r.text:
                    r.failure(f"status {r.status_code}")
            return
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, headers=HEADERS, stream=True,
                              catch_response=True, name="/v1/chat/completions (stream)") as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
                return
            first, buffered = None, b""
            while chunk := r.stream.read(4096):
                if first is None and b'"content":"' in chunk.replace(b'"content":""', b""):
                    first = time.perf_counter()
                buffered = (buffered + chunk)[-64:]
            if b"data: [DONE]" not in buffered:
                r.failure("the stream ended without [DONE]")
            elif first is not None:
                self.environment.events.request.fire(request_type="TTFT", name="/v1/chat/completions (stream)",
                                                     response_time=(first - started) * 1000, response_length=0,
                                                     exception=None, context={})
