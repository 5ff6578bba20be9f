"""Soak: a steady rate of streamed requests through the gateway for a long time (10 minutes by
default), sampling the gateway's memory, latency and errors every interval. The result file is
rewritten after every sample, so a run stopped early still leaves its record.

Memory counts as flat when, after the warm-up (the first minute: pools, caches and the allocator
find their size), no later sample's resident memory is more than 10% above the first post-warm-up
sample.

    python -m loadtests.soak                      # 10 minutes at 50 streams/s; loadtests/results/soak-<timestamp>.json
    python -m loadtests.soak --minutes 1 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import uvloop

from loadtests.bench import RESULTS, machine
from loadtests.loadgen import Run, Target, Workload, pace, summarize
from loadtests.stack import Service, start_gateway, start_upstream

FLAT_WITHIN = 0.10


def memory_verdict(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Growth of the gateway's resident memory after the warm-up, against the first sample after it."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        return {"flat": None, "reason": "not enough samples after the warm-up"}
    base = after[0]["gateway_rss_mib"]
    peak, last = max(s["gateway_rss_mib"] for s in after), after[-1]["gateway_rss_mib"]
    return {"baseline_mib": base, "peak_mib": peak, "last_mib": last, "peak_growth": peak / base - 1,
            "last_growth": last / base - 1, "flat": peak <= base * (1 + FLAT_WITHIN)}


async def soak(gateway: Service, upstream: Service, workload: Workload, rate: float, duration_s: float,
               interval_s: float, record: dict[str, Any], save: Callable[[], None], log: TextIO) -> None:
    """Send at `rate` for `duration_s`; every `interval_s` append a sample to `record` and `save()`."""
    run, tasks, lags = Run(Target(gateway.url, gateway.model, gateway.key), workload), set(), []
    sender = asyncio.create_task(pace(run, rate, duration_s, tasks, lags))
    t0 = last = time.perf_counter()
    cpu = gateway.cpu_seconds()
    while not sender.done():
        await asyncio.wait({sender}, timeout=max(0.0, last + interval_s - time.perf_counter()))
        now = time.perf_counter()
        window, run.outcomes = run.outcomes, []
        window_lags, lags[:] = list(lags), []
        summary = summarize(window, window_lags, now - last, run.peak)
        cpu_now = gateway.cpu_seconds()
        sample = {"t_s": round(now - t0, 1), "gateway_rss_mib": gateway.rss_bytes() / 2**20,
                  "upstream_rss_mib": upstream.rss_bytes() / 2**20, "ok": summary["ok"], "errors": summary["errors"],
                  "error_kinds": summary["error_kinds"], "throughput_rps": summary["throughput_rps"],
                  "latency_ms": summary["latency_ms"], "ttft_ms": summary["ttft_ms"], "in_flight": run.in_flight,
                  "gateway_cpu_cores": (cpu_now - cpu) / (now - last), "load_avg_1m": os.getloadavg()[0]}
        record["samples"].append(sample)
        save()
        ttft = (sample["ttft_ms"] or {}).get("p99")
        print(f"{sample['t_s']:7.1f} s  rss {sample['gateway_rss_mib']:7.1f} MiB  ok {sample['ok']:5d}  errors "
              f"{sample['errors']}  ttft p99 {ttft if ttft is None else round(ttft, 1)} ms  load {sample['load_avg_1m']:.2f}",
              file=log, flush=True)
        last, cpu = now, cpu_now
    run.outcomes = []
    await run.drain(tasks, time.perf_counter() + workload.grace_s)
    record["stragglers"] = {"errors": sum(o.error is not None for o in run.outcomes)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=50.0, help="streamed requests per second (default 50)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer (default 16)")
    p.add_argument("--token-delay-ms", type=float, default=10.0, help="upstream pace (default 10 ms per token)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline (default 60)")
    p.add_argument("--out", type=Path, help="result file (default loadtests/results/soak-<timestamp>.json)")
    args = p.parse_args(argv)
    started = datetime.now(UTC)
    out = args.out or RESULTS / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"), "machine": machine(),
        "command": shlex.join(["python", "-m", "loadtests.soak", *(sys.argv[1:] if argv is None else argv)]),
        "rate": args.rate, "minutes": args.minutes, "tokens": args.tokens, "token_delay_ms": args.token_delay_ms,
        "stream": True, "samples": [],
    }

    def save() -> None:
        record["memory"] = memory_verdict(record["samples"], args.warmup)
        record["errors"] = sum(s["errors"] for s in record["samples"]) + record.get("stragglers", {}).get("errors", 0)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        tmp.replace(out)

    workdir = Path(tempfile.mkdtemp(prefix="salora-soak-"))
    with ExitStack() as stack:
        upstream = start_upstream(stack, workdir, tokens=args.tokens)
        httpx.post(f"{upstream.url}/fake/config", json={"token_delay_ms": args.token_delay_ms}).raise_for_status()
        gateway = start_gateway(stack, workdir, upstream)
        workload = Workload(stream=True, max_tokens=args.tokens, timeout_s=60)
        uvloop.run(soak(gateway, upstream, workload, args.rate, args.minutes * 60, args.interval, record, save, sys.stderr))
    save()
    print(json.dumps({"out": str(out), "errors": record["errors"], "memory": record["memory"]}, indent=1))


if __name__ == "__main__":
    main()
