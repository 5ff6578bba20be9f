"""The headline measurement: the same load on the fake upstream directly, through this gateway and
through LiteLLM's proxy, interleaved, in one command.

For each request rate, the three targets run one after the other (in an order that rotates with the
rate), so drift in the shared machine's load hits all three alike. A target that cannot sustain a
rate (errors, under 95% of the offered rate completed, or p99 over 500 ms) is retried once, and
after a confirmed failure it skips the higher rates. Then, with the upstream pacing its tokens,
each target holds a fixed number of concurrent streams. Every run records the CPU each process
spent and what the rest of the machine used meanwhile, because the machine is shared.

    python -m loadtests.bench                       # ~5-10 minutes; writes loadtests/results/<timestamp>.{json,md,png}
    python -m loadtests.bench --rates 100,500 --duration 5 --targets direct,gateway
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import psutil
import uvloop

from loadtests.loadgen import Target, Workload, closed_loop, open_loop
from loadtests.stack import ROOT, Service, litellm_command, start_gateway, start_litellm, start_upstream

TARGETS = ("direct", "gateway", "litellm")
DEFAULT_RATES = (50, 100, 200, 300, 400, 500, 700, 1000, 1500, 2000)
RESULTS = ROOT / "loadtests" / "results"
MAX_P99_MS = 500.0  # above this a rate does not count as sustained, whatever the throughput
MIN_COMPLETED = 0.95  # share of the offered rate that must complete


@dataclass(frozen=True)
class BenchConfig:
    rates: tuple[float, ...] = DEFAULT_RATES
    duration_s: float = 10.0
    targets: tuple[str, ...] = TARGETS
    max_tokens: int = 16
    stream_concurrency: int = 500  # 0: no streams phase
    stream_tokens: int = 20
    token_delay_ms: float = 100.0
    stream_duration_s: float = 15.0
    settle_s: float = 1.0  # pause between runs
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="salora-bench-")))

    @property
    def stream_cap(self) -> int | None:
        """The bench tenant's `limits.max_concurrent_streams`: exactly the streams it holds, so a
        slot that is not freed shows as a 429 (None, the default cap, when there is no streams phase)."""
        return self.stream_concurrency or None


def machine() -> dict[str, Any]:
    """What the numbers were measured on (no host name)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent working (guest time is already inside user)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


async def measure(service: Service, services: list[Service], workload: Workload, *, rate: float | None = None,
                  concurrency: int | None = None, duration_s: float) -> dict[str, Any]:
    """One run against `service`, with each process's CPU per completed request and the CPU the
    rest of the machine used meanwhile (in cores), so contention is on the record."""
    target = Target(service.url, service.model, service.key)
    me = psutil.Process()
    before = {s.name: s.cpu_seconds() for s in services}
    own_before, busy_before, load_before, started = sum(me.cpu_times()[:2]), _busy_cpu_s(), os.getloadavg(), time.perf_counter()
    if rate is not None:
        run = await open_loop(target, workload, rate, duration_s)
    else:
        assert concurrency is not None
        run = await closed_loop(target, workload, concurrency, duration_s)
    wall = time.perf_counter() - started
    spent = {s.name: s.cpu_seconds() - before[s.name] for s in services}
    own = sum(me.cpu_times()[:2]) - own_before
    others = (_busy_cpu_s() - busy_before) - own - sum(spent.values())
    ok = max(1, run["ok"])
    run["cpu_ms_per_request"] = {**{name: 1000 * s / ok for name, s in spent.items()}, "loadgen": 1000 * own / ok}
    run["others_cores"] = max(0.0, others / wall)
    run["load_avg_1m"] = [load_before[0], os.getloadavg()[0]]
    return run


def sustained(run: dict[str, Any], rate: float) -> bool:
    return (run["errors"] == 0 and run["latency_ms"] is not None and run["throughput_rps"] >= MIN_COMPLETED * rate
            and run["latency_ms"]["p99"] <= MAX_P99_MS)


def _row(run: dict[str, Any], direct: dict[str, Any] | None, key: str = "latency_ms") -> dict[str, Any]:
    """The per-rate entry of the results: absolute and added latencies (this minus direct) in ms."""
    lat = run[key] or {}
    base = (direct or {}).get(key) or {}
    row: dict[str, float | None] = {f"{q}_ms": lat.get(q) for q in ("p50", "p95", "p99")}
    for q in ("p50", "p95", "p99"):
        row[f"added_{q}_ms"] = lat[q] - base[q] if q in lat and q in base else None
    return row


def _entry(run: dict[str, Any], direct: dict[str, Any] | None, rate: float) -> dict[str, Any]:
    return {"offered_rps": rate, "throughput_rps": run["throughput_rps"], **_row(run, direct),
            "errors": run["errors"], "error_kinds": run["error_kinds"], "sustained": sustained(run, rate),
            "cpu_ms_per_request": run["cpu_ms_per_request"], "others_cores": run["others_cores"],
            "load_avg_1m": run["load_avg_1m"], "run": run}


def _set_token_delay(upstream: Service, ms: float) -> None:
    httpx.post(f"{upstream.url}/fake/config", json={"token_delay_ms": ms}).raise_for_status()


async def _sweep(cfg: BenchConfig, services: dict[str, Service], log: TextIO) -> dict[str, dict[str, Any]]:
    everyone = list(services.values())
    workload = Workload(stream=False, max_tokens=cfg.max_tokens)
    for name in cfg.targets:  # warm-up: connections, imports on first use, caches
        await open_loop(Target(services[name].url, services[name].model, services[name].key), workload, 50, 2)
    runs: dict[str, dict[float, dict[str, Any]]] = {name: {} for name in cfg.targets}
    failed: set[str] = set()
    for i, rate in enumerate(cfg.rates):
        order = list(cfg.targets[i % len(cfg.targets):] + cfg.targets[:i % len(cfg.targets)])
        for name in order:
            if name in failed:
                continue
            run = await measure(services[name], everyone, workload, rate=rate, duration_s=cfg.duration_s)
            if not sustained(run, rate):  # once more, in case a neighbour's burst caused it
                await asyncio.sleep(cfg.settle_s)
                first = run
                run = await measure(services[name], everyone, workload, rate=rate, duration_s=cfg.duration_s)
                run["retry_of"] = {k: first[k] for k in ("errors", "error_kinds", "throughput_rps", "latency_ms")}
                if not sustained(run, rate):
                    failed.add(name)
            runs[name][rate] = run
            lat = run["latency_ms"] or {}
            print(f"{name:8s} {rate:7.0f}/s  p50 {_fmt(lat.get('p50')):>8s} ms  p99 {_fmt(lat.get('p99')):>8s} ms"
                  f"  errors {run['errors']:4d}  {run['throughput_rps']:7.1f}/s  others {run['others_cores']:.2f} cores",
                  file=log, flush=True)
            await asyncio.sleep(cfg.settle_s)
    direct = runs.get("direct", {})
    return {name: {f"{rate:g}": _entry(run, direct.get(rate), rate) for rate, run in by_rate.items()}
            for name, by_rate in runs.items()}


async def _streams(cfg: BenchConfig, services: dict[str, Service], log: TextIO) -> dict[str, Any]:
    _set_token_delay(services["upstream"], cfg.token_delay_ms)
    workload = Workload(stream=True, max_tokens=cfg.stream_tokens, timeout_s=60)
    out: dict[str, Any] = {"concurrency": cfg.stream_concurrency, "tokens": cfg.stream_tokens,
                           "token_delay_ms": cfg.token_delay_ms}
    try:
        for name in cfg.targets:
            run = await measure(services[name], list(services.values()), workload,
                                concurrency=cfg.stream_concurrency, duration_s=cfg.stream_duration_s)
            out[name] = run
            print(f"{name:8s} {cfg.stream_concurrency} streams  peak {run['peak_in_flight']}  ttft p99 "
                  f"{_fmt((run['ttft_ms'] or {}).get('p99'))} ms  errors {run['errors']}", file=log, flush=True)
            await asyncio.sleep(cfg.settle_s)
    finally:
        _set_token_delay(services["upstream"], 0)
    for name in cfg.targets:
        out[name]["held"] = out[name]["errors"] == 0 and out[name]["peak_in_flight"] >= cfg.stream_concurrency
        out[name]["ttft"] = _row(out[name], out.get("direct"), "ttft_ms")
    return out


def max_sustained(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The highest rate each target sustained with no error (None: not even the lowest)."""
    return {name: max((e["offered_rps"] for e in by_rate.values() if e["sustained"]), default=None)
            for name, by_rate in results.items()}


def run_bench(cfg: BenchConfig, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Start the processes, run the sweep and the streams phase, stop everything; the results."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    with ExitStack() as stack:
        upstream = start_upstream(stack, cfg.workdir)
        services = {"upstream": upstream, "direct": upstream}
        if "gateway" in cfg.targets:
            # The streams phase holds `stream_concurrency` streams of one tenant: its cap must fit them.
            services["gateway"] = start_gateway(stack, cfg.workdir, upstream, max_streams=cfg.stream_cap)
        if "litellm" in cfg.targets:
            command = litellm_command()
            if command is None:
                raise SystemExit("LiteLLM not found: install it (see docs/performance.md) or leave it out of --targets")
            services["litellm"] = start_litellm(stack, cfg.workdir, upstream, command)
        measured = {k: v for k, v in services.items() if k != "direct"}

        async def both() -> tuple[dict[str, Any], dict[str, Any] | None]:
            sweep = await _sweep(cfg, measured | {"direct": upstream}, log)
            streams = await _streams(cfg, measured | {"direct": upstream}, log) if cfg.stream_concurrency else None
            return sweep, streams

        sweep, streams = uvloop.run(both())
    return {
        **sweep,
        "max_sustained_rps": max_sustained(sweep),
        "streams": streams,
        "machine": machine(),
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "config": {"rates": list(cfg.rates), "duration_s": cfg.duration_s, "max_tokens": cfg.max_tokens,
                   "targets": list(cfg.targets), "max_p99_ms": MAX_P99_MS, "min_completed": MIN_COMPLETED},
        "workdir": str(cfg.workdir),
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per target and rate, then the streams and the maximum sustained rates."""
    lines = ["| target | offered /s | done /s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | "
             "CPU ms/req (target) | other load (cores) | load avg 1m | generator lag p99 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in TARGETS:
        for e in (results.get(name) or {}).values():
            cpu = e["cpu_ms_per_request"].get("upstream" if name == "direct" else name)
            lines.append(f"| {name} | {e['offered_rps']:g} | {e['throughput_rps']:.0f} | {_fmt(e['p50_ms'])} | "
                         f"{_fmt(e['p99_ms'])} | {_fmt(e['added_p50_ms'])} | {_fmt(e['added_p99_ms'])} | "
                         f"{e['errors']} | {_fmt(cpu)} | {e['others_cores']:.2f} | {e['load_avg_1m'][1]:.2f} | "
                         f"{e['run']['send_lag_p99_ms']:.1f} |")
    out = "\n".join(lines)
    out += "\n\nHighest rate sustained (no errors, >= 95% completed, p99 <= 500 ms): " + ", ".join(
        f"{name} {_fmt(rate, 0)}/s" for name, rate in results["max_sustained_rps"].items())
    streams = results.get("streams")
    if streams:
        out += (f"\n\n{streams['concurrency']} concurrent streams ({streams['tokens']} tokens, "
                f"{streams['token_delay_ms']:g} ms apart):\n\n| target | held | peak open | streams done | errors | "
                "TTFT p50 ms | TTFT p99 ms | added TTFT p99 ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in TARGETS:
            if name in streams:
                s = streams[name]
                out += (f"\n| {name} | {'yes' if s['held'] else 'no'} | {s['peak_in_flight']} | {s['ok']} | {s['errors']} | "
                        f"{_fmt(s['ttft']['p50_ms'])} | {_fmt(s['ttft']['p99_ms'])} | {_fmt(s['ttft']['added_p99_ms'])} |")
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Added p50 and p99 latency against the offered rate; hollow markers: rate not sustained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        for name, color in (("gateway", "tab:blue"), ("litellm", "tab:red")):
            entries = list((results.get(name) or {}).values())
            if not entries:
                continue
            xs = [e["offered_rps"] for e in entries]
            ys = [max(e[f"added_{q}_ms"] or 0.0, 0.01) for e in entries]
            ax.plot(xs, ys, color=color, label=name)
            ax.scatter(xs, ys, color=color, facecolors=[color if e["sustained"] else "none" for e in entries], zorder=3)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("offered requests / s (open loop, non-streaming)")
        ax.set_ylabel(f"added {q} latency, ms (vs. upstream directly)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Gateway overhead, {results['date']}, {results['machine']['cores']} cores (shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="requests per second, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--targets", default=",".join(TARGETS), help="any of direct,gateway,litellm (direct is always run)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length (default 16)")
    p.add_argument("--streams", type=int, default=500, help="concurrent streams to hold (0: skip; default 500)")
    p.add_argument("--stream-tokens", type=int, default=20)
    p.add_argument("--token-delay-ms", type=float, default=100.0, help="upstream pace during the streams phase")
    p.add_argument("--stream-duration", type=float, default=15.0, help="seconds of the streams phase per target")
    p.add_argument("--out", type=Path, default=RESULTS, help="where <timestamp>.json/.md/.png go")
    args = p.parse_args(argv)
    targets = tuple(dict.fromkeys(["direct", *args.targets.split(",")]))
    unknown = set(targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    cfg = BenchConfig(rates=tuple(float(r) for r in args.rates.split(",")), duration_s=args.duration, targets=targets,
                      max_tokens=args.max_tokens, stream_concurrency=args.streams, stream_tokens=args.stream_tokens,
                      token_delay_ms=args.token_delay_ms, stream_duration_s=args.stream_duration)
    results = run_bench(cfg)
    results["command"] = shlex.join(["python", "-m", "loadtests.bench", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / datetime.fromisoformat(results["date"]).strftime("%Y%m%dT%H%M%SZ")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, allow_nan=False, default=str) + "\n")
    md = f"{results['date']}, {results['machine']['cpu']}, {results['machine']['cores']} cores, `{results['command']}`\n\n{table(results)}\n"
    stem.with_suffix(".md").write_text(md)
    plot(results, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
