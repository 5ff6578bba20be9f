"""`make bench-check`: a short benchmark that fails when the gateway's CPU per request, as a multiple of
the fake upstream's in the same run, passes the bound kept in `loadtests/bound.json`.

Why the ratio: on a shared machine absolute CPU times move with the neighbours (and differ between
machines), but the gateway and the upstream it proxies suffer alike, so their ratio is the figure a
regression shows in. A proxy parses one request and makes one, so a bare server is the floor.

Direct and gateway targets at two rates (200 and 500 requests/s, 5 s each), no streams phase. A
rate over the bound is measured once more before the check fails, so one neighbour's burst does not
fail a release. Two to three minutes on the 2-core machine; the release steps in the README run it.

    python -m loadtests.check [--rates 200,500] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from loadtests.bench import BenchConfig, run_bench
from loadtests.stack import ROOT

BOUND_FILE = ROOT / "loadtests" / "bound.json"


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """Per rate: the gateway's CPU per request over the upstream's, both measured in the gateway's run."""
    out = {}
    for rate, entry in (results.get("gateway") or {}).items():
        cpu = entry["cpu_ms_per_request"]
        out[rate] = cpu["gateway"] / max(cpu["upstream"], 1e-9)
    return out


def verdict(results: dict[str, Any], bound: float) -> tuple[bool, list[str]]:
    """Whether every rate's ratio is within `bound` and had no errors; one line per rate."""
    lines, ok = [], True
    rates = ratios(results)
    if not rates:
        return False, ["no gateway runs in the results"]
    for rate, ratio in rates.items():
        entry = results["gateway"][rate]
        good = ratio <= bound and entry["errors"] == 0
        ok &= good
        cpu = entry["cpu_ms_per_request"]
        lines.append(f"{'ok  ' if good else 'FAIL'} {float(rate):6.0f}/s  gateway {cpu['gateway']:.3f} ms, upstream "
                     f"{cpu['upstream']:.3f} ms per request: ratio {ratio:.2f} (bound {bound:g}), errors {entry['errors']}, "
                     f"load average {entry['load_avg_1m'][1]:.1f}")
    return ok, lines


def load_bound(path: Path = BOUND_FILE) -> float:
    return float(json.loads(path.read_text())["max_gateway_upstream_cpu_ratio"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="200,500", help="requests per second, comma-separated (default 200,500)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--bound", type=Path, default=BOUND_FILE, help="the JSON file holding the bound")
    args = p.parse_args(argv)
    bound = load_bound(args.bound)
    cfg = BenchConfig(rates=tuple(float(r) for r in args.rates.split(",")), duration_s=args.duration,
                      targets=("direct", "gateway"), stream_concurrency=0)
    ok, lines = verdict(run_bench(cfg), bound)
    if not ok:
        print("\n".join(lines), "\nover the bound: measuring once more (a neighbour's burst?)", file=sys.stderr)
        ok, lines = verdict(run_bench(cfg), bound)
    print("\n".join(lines))
    print(f"bench-check: {'pass' if ok else 'FAIL'} (bound {bound:g} in {args.bound}; load average now "
          f"{os.getloadavg()[0]:.1f})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
