"""A/B: the CPU per request of two versions of the gateway, side by side in one run.

One fake upstream, two `salora serve` processes in front of it: A from another checkout (`--a`, e.g.
`git archive <commit> | tar -x -C /tmp/base`), B from this one. The same open-loop load goes to A,
then B, then A ... for `--rounds` rounds, so drift in a shared machine's load hits both alike. Each
run records both processes' CPU per completed request and the gateway/upstream ratio; the summary
gives each variant's median and the spread of its rounds.

    python -m loadtests.ab --a /tmp/base --rate 300 --duration 5 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import uvloop

from loadtests.bench import measure
from loadtests.loadgen import Target, Workload, open_loop
from loadtests.stack import ROOT, Service, start_gateway, start_upstream


def _median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


async def _rounds(gateways: dict[str, Service], upstream: Service, workload: Workload, rate: float,
                  duration_s: float, rounds: int) -> list[dict[str, Any]]:
    everyone = [upstream, *gateways.values()]
    for g in gateways.values():  # warm-up: connections, first-use imports
        await open_loop(Target(g.url, g.model, g.key), workload, 50, 2)
    out = []
    for i in range(rounds):
        for name in (list(gateways) if i % 2 == 0 else list(reversed(gateways))):
            run = await measure(gateways[name], everyone, workload, rate=rate, duration_s=duration_s)
            cpu = run["cpu_ms_per_request"]
            row = {"round": i, "variant": name, "gateway_ms": cpu[name], "upstream_ms": cpu["upstream"],
                   "ratio": cpu[name] / max(cpu["upstream"], 1e-9), "errors": run["errors"], "ok": run["ok"],
                   "p50_ms": (run["latency_ms"] or {}).get("p50"), "p99_ms": (run["latency_ms"] or {}).get("p99"),
                   "load_avg_1m": run["load_avg_1m"][1], "others_cores": run["others_cores"]}
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            await asyncio.sleep(1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="the other checkout (variant A)")
    p.add_argument("--b", type=Path, default=ROOT, help="variant B (default: this checkout)")
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--stream", action="store_true")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="salora-ab-"))
    workload = Workload(stream=args.stream)
    with ExitStack() as stack:
        upstream = start_upstream(stack, workdir)
        gateways = {}
        for name, source in (("A", args.a), ("B", args.b)):
            (workdir / name).mkdir()
            gateways[name] = start_gateway(stack, workdir / name, upstream, source=source.resolve(), name=name)
        rows = uvloop.run(_rounds(gateways, upstream, workload, args.rate, args.duration, args.rounds))
    print(f"A = {args.a}, B = {args.b}; {args.rate:g} req/s {'streamed' if args.stream else 'non-streamed'}, "
          f"{args.duration:g} s x {args.rounds} rounds, alternating; load average (1 min) "
          f"{min(r['load_avg_1m'] for r in rows):.1f}-{max(r['load_avg_1m'] for r in rows):.1f}, now {os.getloadavg()[0]:.1f}")
    print("| variant | gateway CPU ms/req, median (range) | upstream CPU ms/req | gateway/upstream | p50 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("A", "B"):
        mine = [r for r in rows if r["variant"] == name]
        print(f"| {name} | {_median_spread([r['gateway_ms'] for r in mine])} | "
              f"{_median_spread([r['upstream_ms'] for r in mine])} | {_median_spread([r['ratio'] for r in mine])} | "
              f"{statistics.median(r['p50_ms'] or 0 for r in mine):.2f} | {sum(r['errors'] for r in mine)} |")


if __name__ == "__main__":
    main()
