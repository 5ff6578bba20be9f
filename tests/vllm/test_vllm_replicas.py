"""Two real vLLM replicas behind one gateway: an adapter's requests go to the replica that holds it,
and when that replica is killed in the middle of a request, the request and those after it succeed
on the other one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.engines.vllm import _rank
from gateway.settings import Settings
from tests.gateway.conftest import LiveGateway
from tests.vllm.conftest import VLLMServer, start_vllm, vllm_metric, vllm_models
from tests.vllm.test_gateway import sample

PROMPT = "Write a short story about a lighthouse keeper."
DONE = "vllm:request_success_total"


@pytest.fixture(scope="module")
def secondary(vllm_up: VLLMServer, embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    server = start_vllm(embedded_dir, "smollm2-vllm", tmp_path_factory.mktemp("vllm-secondary") / "vllm.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def name(vllm_up: VLLMServer, secondary: VLLMServer) -> str:
    """An adapter name whose home, by the gateway's rendezvous hashing, is the secondary replica, so
    that killing its holder leaves the session's primary server running (the ports, and so the
    home of any one name, change from run to run)."""
    return next(n for n in (f"arith{i}" for i in range(64)) if _rank(n, secondary.url) < _rank(n, vllm_up.url))


@pytest.fixture(scope="module")
def gateway(serve_app, vllm_up: VLLMServer, secondary: VLLMServer, salora_adapter: Path, name: str,
            tmp_path_factory: pytest.TempPathFactory) -> LiveGateway:
    """No health checks run during the test: the request that meets the dead replica finds out by
    itself."""
    state = tmp_path_factory.mktemp("vllm-replicas")
    (state / "shared").mkdir()
    settings = Settings(model="embedded", engine="vllm", state_dir=state, adapters={name: salora_adapter},
                        vllm={"urls": [secondary.url, vllm_up.url], "adapter_dir": state / "shared",
                              "health_interval_s": 3600})
    gw = serve_app(settings)
    gw.wait_ready(timeout=180)
    return gw


def test_requests_go_to_the_replica_holding_their_adapter(gateway: LiveGateway, vllm_up: VLLMServer,
                                                          secondary: VLLMServer, name: str) -> None:
    assert name in vllm_models(secondary) and name not in vllm_models(vllm_up)
    before = {s.url: vllm_metric(s, DONE) for s in (secondary, vllm_up)}
    for _ in range(3):
        assert gateway.chat("none", name, PROMPT, max_tokens=4).choices[0].message.content
    after = {s.url: vllm_metric(s, DONE) for s in (secondary, vllm_up)}
    assert after[secondary.url] - before[secondary.url] == 3 and after[vllm_up.url] == before[vllm_up.url]


def unread_bytes(url: str) -> int:
    """Bytes that clients sent to the server at `url` and it has not read (Linux /proc/net/tcp:
    the receive queues of its established connections)."""
    port = httpx.URL(url).port
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, _, state, queues, *_ = line.split()
        if int(local.split(":")[1], 16) == port and state == "01":
            total += int(queues.split(":")[1], 16)
    return total


def test_killing_the_holder_mid_request_fails_over(gateway: LiveGateway, vllm_up: VLLMServer,
                                                   secondary: VLLMServer, name: str) -> None:
    """The holder is frozen first, so the request is certainly on it, sent and unanswered, when it
    is killed (catching it while generating raced a fast answer on CI)."""
    expected = gateway.chat("none", name, PROMPT, max_tokens=48).choices[0].message.content
    secondary.freeze()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(gateway.chat, "none", name, PROMPT, max_tokens=48)
        deadline = time.monotonic() + 60
        while unread_bytes(secondary.url) == 0:
            assert time.monotonic() < deadline and not running.done()
            time.sleep(0.02)
        secondary.kill()
        answer = running.result(timeout=300).choices[0].message.content
    assert answer == expected  # answered again, from the start, by the other replica
    assert sample(gateway, "salora_engine_errors_total", engine="vllm", kind="retry") >= 1
    assert sample(gateway, "salora_engine_errors_total", engine="vllm", kind="replica_down") == 1
    assert name in vllm_models(vllm_up)
    stream = gateway.client("none").chat.completions.create(
        model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=48, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert gateway.chat("none", gateway.ctx.engine.model_id, PROMPT, max_tokens=4).choices[0].message.content
