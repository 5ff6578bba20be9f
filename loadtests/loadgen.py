"""Load generator: open loop at a fixed request rate, or closed loop at a fixed concurrency.

Open loop sends request i at `start + i / rate` whatever the server does (a slow server gets a
queue, as in production), so saturation shows as latency and errors, not as a politely lower rate.
Closed loop keeps `concurrency` requests in flight (e.g. 500 open streams). Every run is bounded:
at most `rate * duration` requests, and whatever is still open `grace` seconds after the last send
is cancelled and counted as a timeout.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --key KEY --model fake-model --rate 500 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import uvloop

from loadtests.client import Outcome, Pool, build_request


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send, as whom, and which model to ask for."""

    url: str
    model: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    stream: bool = False
    max_tokens: int = 16
    timeout_s: float = 30.0  # one request
    grace_s: float = 10.0  # after the last send, for the stragglers

    def body(self, model: str) -> bytes:
        body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                                   "max_tokens": self.max_tokens, "temperature": 0}
        if self.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return json.dumps(body).encode()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty ascending list (q in 0..100)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def _summary_ms(seconds: list[float]) -> dict[str, float] | None:
    """Percentiles, max and mean in ms; None when there is nothing to summarize."""
    if not seconds:
        return None
    values = sorted(s * 1000 for s in seconds)
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": values[-1], "mean": sum(values) / len(values)}


def summarize(outcomes: list[Outcome], lags: list[float], wall_s: float, peak_in_flight: int) -> dict[str, object]:
    """Throughput (completed per second of wall time), latency and TTFT percentiles of the successful
    requests in ms, and errors by kind. `send_lag` is how late the generator sent (its own health)."""
    ok = [o for o in outcomes if o.error is None]
    errors = Counter(o.error for o in outcomes if o.error is not None)
    ttfts = [o.first_token - o.sent for o in ok if o.first_token is not None]
    return {
        "sent": len(outcomes), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": dict(errors),
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0, "wall_s": wall_s,
        "latency_ms": _summary_ms([o.done - o.sent for o in ok]),
        "ttft_ms": _summary_ms(ttfts),
        "send_lag_p99_ms": percentile(sorted(lag * 1000 for lag in lags), 99) if lags else 0.0,
        "peak_in_flight": peak_in_flight,
    }


class Run:
    """State shared by the requests of one run."""

    def __init__(self, target: Target, workload: Workload) -> None:
        url = urlsplit(target.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        self.pool = Pool(host, port)
        self.request = build_request(host, port, f"{url.path.rstrip('/')}/v1/chat/completions",
                                     workload.body(target.model), target.key)
        self.workload = workload
        self.outcomes: list[Outcome] = []
        self.in_flight = self.peak = 0

    async def one(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            outcome = await self.pool.request(self.request, self.workload.stream, self.workload.timeout_s)
        except Exception as e:  # anything the client did not expect still counts, as an error
            now = time.perf_counter()
            outcome = Outcome(now, now, None, type(e).__name__)
        finally:
            self.in_flight -= 1
        self.outcomes.append(outcome)

    async def drain(self, tasks: set[asyncio.Task[None]], deadline: float) -> None:
        """Wait for open requests until `deadline`; cancel the rest and count them as timeouts."""
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            now = time.perf_counter()
            self.outcomes += [Outcome(now, now, None, "timeout") for _ in pending]
        self.pool.close()


async def pace(run: Run, rate: float, duration_s: float, tasks: set[asyncio.Task[None]], lags: list[float]) -> float:
    """Start `rate * duration_s` requests at a constant pace, each as a task in `tasks` (removed when
    done), recording how late each was sent in `lags`; returns the start time."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.01
    for i in range(int(rate * duration_s)):
        due = start + i / rate
        wait = due - time.perf_counter()
        if wait > 0.0005:  # libuv timers are coarse; anything shorter is sent now
            await asyncio.sleep(wait)
        lags.append(max(0.0, time.perf_counter() - due))
        task = loop.create_task(run.one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return start


async def open_loop(target: Target, workload: Workload, rate: float, duration_s: float) -> dict[str, object]:
    """`rate * duration_s` requests at a constant pace; latency from each actual send."""
    run, tasks, lags = Run(target, workload), set(), []
    start = await pace(run, rate, duration_s, tasks, lags)
    await run.drain(tasks, time.perf_counter() + workload.grace_s)
    return {"mode": "open", "rate": rate, "duration_s": duration_s, "stream": workload.stream,
            "connections_opened": run.pool.opened,
            **summarize(run.outcomes, lags, _wall(run.outcomes, start), run.peak)}


async def closed_loop(target: Target, workload: Workload, concurrency: int, duration_s: float) -> dict[str, object]:
    """`concurrency` workers, each sending its next request as soon as the last one ends, until
    `duration_s` has passed; the ramp-up opens all connections at once."""
    run, loop = Run(target, workload), asyncio.get_running_loop()
    start = time.perf_counter()
    stop = start + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop:
            await run.one()

    tasks = {loop.create_task(worker()) for _ in range(concurrency)}
    await run.drain(tasks, stop + workload.timeout_s + workload.grace_s)
    return {"mode": "closed", "concurrency": concurrency, "duration_s": duration_s, "stream": workload.stream,
            "connections_opened": run.pool.opened,
            **summarize(run.outcomes, [], _wall(run.outcomes, start), run.peak)}


def _wall(outcomes: list[Outcome], start: float) -> float:
    return max((o.done for o in outcomes), default=start) - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL (the client adds /v1/chat/completions)")
    p.add_argument("--model", required=True)
    p.add_argument("--key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default $OPENAI_API_KEY)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending (default 10)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for one request")
    args = p.parse_args(argv)
    target = Target(args.url, args.model, args.key)
    workload = Workload(args.stream, args.max_tokens, args.timeout)
    if args.rate is not None:
        result = uvloop.run(open_loop(target, workload, args.rate, args.duration))
    else:
        result = uvloop.run(closed_loop(target, workload, args.concurrency, args.duration))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
