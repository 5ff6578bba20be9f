"""The bench's streams phase measures what it says: its tenant's stream cap fits the 500 streams it
holds, while a gateway on the default limits still refuses a tenant's 17th open stream (429).

Both gateways are real `salora serve` processes in front of the fake upstream, which paces its
tokens so that every stream stays open for seconds. Shapes and counts only, never timings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import httpx
import pytest
import uvloop

from gateway.settings import Limits
from loadtests.bench import BenchConfig, _set_token_delay
from loadtests.loadgen import Target, Workload, closed_loop
from loadtests.stack import Service, start_gateway, start_upstream

DEFAULT_CAP = Limits().max_concurrent_streams  # 16
TOKEN_DELAY_MS = 300.0  # 16 tokens (the upstream's most): each stream stays open about 5 s


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with ExitStack() as stack:
        service = start_upstream(stack, tmp_path_factory.mktemp("upstream"))
        _set_token_delay(service, TOKEN_DELAY_MS)
        yield service


def _body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "stream": True}


async def _hold_streams(gateway: Service, n: int) -> list[tuple[int, str | None, dict[str, object] | None]]:
    """Open `n` streams at once and keep them open (headers read, body not), then one more; then
    close them all. Per stream: its status, its Retry-After and, for a refusal, its error body."""
    headers = {"Authorization": f"Bearer {gateway.key}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60,
                                 limits=httpx.Limits(max_connections=n + 1)) as client, AsyncExitStack() as held:

        async def one() -> tuple[int, str | None, dict[str, object] | None]:
            r = await held.enter_async_context(client.stream("POST", "/v1/chat/completions", json=_body(gateway.model)))
            error = json.loads(await r.aread()) if r.status_code != 200 else None
            return r.status_code, r.headers.get("retry-after"), error

        first = await asyncio.gather(*(one() for _ in range(n)))  # the upstream's answers last ~5 s
        return [*first, await one()]


def test_default_cap_refuses_the_17th_stream(upstream: Service, tmp_path: Path) -> None:
    with ExitStack() as stack:
        gateway = start_gateway(stack, tmp_path, upstream)  # no max_streams: the default limits
        streams = uvloop.run(_hold_streams(gateway, DEFAULT_CAP))
    assert [status for status, _, _ in streams[:DEFAULT_CAP]] == [200] * DEFAULT_CAP
    status, retry_after, error = streams[DEFAULT_CAP]
    assert (status, retry_after) == (429, "1")
    assert error is not None and error["error"]["code"] == "concurrent_streams_exceeded"  # type: ignore[index]


def test_bench_configuration_holds_its_500_streams(upstream: Service, tmp_path: Path) -> None:
    cfg = BenchConfig(workdir=tmp_path)
    assert cfg.stream_concurrency == 500 and cfg.stream_cap == cfg.stream_concurrency
    with ExitStack() as stack:
        gateway = start_gateway(stack, tmp_path, upstream, max_streams=cfg.stream_cap)
        target = Target(gateway.url, gateway.model, gateway.key)
        # A short phase: each of the 500 workers opens one stream of ~5 s, so all 500 are open together.
        run = uvloop.run(closed_loop(target, Workload(stream=True, max_tokens=16, timeout_s=60), cfg.stream_concurrency, 0.5))
    assert run["errors"] == 0, run["error_kinds"]
    assert run["ok"] >= cfg.stream_concurrency and run["peak_in_flight"] == cfg.stream_concurrency
