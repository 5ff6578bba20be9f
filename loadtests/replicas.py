"""The replica benchmark (docs/replicas.md): what sharing limits through Redis costs on the hot path,
how fast a change on one replica reaches the others, and how exactly N replicas hold one limit.

1. Overhead: the fake upstream behind a gateway with in-process limits and behind one with the limits
   in Redis, runs alternated (A, B, A, B, ...) at one rate, so the shared machine's drift hits both;
   the added latency is B's p50/p99 minus A's, per round. Before that, one Redis admission round trip
   is timed on its own (the figure that decides whether quota slices per replica are needed).
2. Propagation: three replicas on one PostgreSQL; a tenant created (then deleted) on one, the time
   until each other replica accepts (then refuses) its key, polled every few milliseconds.
3. Accuracy: a burst far over a tenant's rpm, and over its tpm, spread across the three replicas at
   once: served / limit.

    python -m loadtests.replicas                     # ~5 minutes; loadtests/results/replicas/<timestamp>.{json,md}
    python -m loadtests.replicas --rate 500 --rounds 3 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from tqdm import tqdm

from gateway.metrics import Metrics
from gateway.shared_limits import SharedLimiter
from gateway.tenants import Tenant
from loadtests.bench import machine
from loadtests.loadgen import Target, Workload, open_loop, percentile
from loadtests.servers import Postgres, Redis
from loadtests.stack import ROOT, Service, _spawn, free_port, gateway_config, start_upstream

RESULTS = ROOT / "loadtests" / "results" / "replicas"
ADMIN_KEY = "bench-admin-key"


def start_replica(stack: ExitStack, workdir: Path, upstream: Service, name: str, **extra: Any) -> Service:
    """`salora serve` in front of the fake upstream with the bench tenant, an admin key and `extra` settings."""
    port = free_port()
    config = {**gateway_config(upstream, workdir, port), "admin_key": ADMIN_KEY, **extra}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, log = _spawn(name, [sys.executable, "-m", "salora_cli", "serve", "--config", str(path)], workdir,
                       {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    service = Service(name, proc, f"http://127.0.0.1:{port}", upstream.model, "sk-salora-loadtest", log)
    stack.callback(service.stop)
    service.wait_ready("/readyz", 180)
    return service


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(v * 1000 for v in values)
    return {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99), "max": ordered[-1], "n": len(ordered)}


async def round_trip(redis_url: str, n: int) -> dict[str, float]:
    """One admission in Redis (the Lua script), timed alone, `n` times in a row."""
    limiter = SharedLimiter(redis_url, 60.0, Metrics())
    tenant = Tenant("round-trip", "", frozenset({"*"}), 10**9, 10**9)
    times = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            await limiter.admit(tenant, 100)
            times.append(time.perf_counter() - started)
    finally:
        await limiter.close()
    return _ms(times)


def overhead(local: Service, shared: Service, rate: float, rounds: int, duration_s: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "shared": []}
    workload = Workload(max_tokens=16)
    for i in tqdm(range(rounds), desc=f"overhead at {rate:g}/s", unit="round"):
        order = (("local", local), ("shared", shared)) if i % 2 == 0 else (("shared", shared), ("local", local))
        for label, service in order:
            target = Target(service.url, service.model, service.key)
            runs[label].append(asyncio.run(open_loop(target, workload, rate, duration_s)))
            time.sleep(1)
    added = {q: [s["latency_ms"][q] - lo["latency_ms"][q] for lo, s in zip(runs["local"], runs["shared"])]
             for q in ("p50", "p99")}
    return {"rate": rate, "runs": runs, "added_ms": {q: statistics.median(v) for q, v in added.items()},
            "added_ms_per_round": added,
            "errors": {k: sum(r["errors"] for r in v) for k, v in runs.items()}}


def _admin(service: Service, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, service.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30, **kw)


def _wait_status(service: Service, key: str, status: int, timeout: float = 30.0) -> float:
    started = time.perf_counter()
    with httpx.Client(timeout=5) as client:
        while client.get(service.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code != status:
            if time.perf_counter() - started > timeout:
                return float("inf")
            time.sleep(0.003)
    return time.perf_counter() - started


def propagation(replicas: list[Service], trials: int) -> dict[str, Any]:
    created, deleted = [], []
    for i in tqdm(range(trials), desc="propagation", unit="tenant"):
        writer, readers = replicas[i % 3], [r for j, r in enumerate(replicas) if j != i % 3]
        name = f"p{i}-{uuid.uuid4().hex[:6]}"
        key = _admin(writer, "POST", "/admin/tenants", json={"name": name, "adapters": ["*"]}).json()["key"]
        created += [_wait_status(r, key, 200) for r in readers]  # measured from the writer's answer
        _admin(writer, "DELETE", f"/admin/tenants/{name}")
        deleted += [_wait_status(r, key, 401) for r in readers]
    return {"created_ms": _ms(created), "deleted_ms": _ms(deleted), "trials": trials}


async def _burst(replicas: list[Service], key: str, n: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        body = {"model": replicas[0].model, "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": max_tokens}
        return await asyncio.gather(*(client.post(replicas[i % 3].url + "/v1/chat/completions", json=body,
                                                  headers={"Authorization": f"Bearer {key}"}) for i in range(n)))


def accuracy(replicas: list[Service], rpm: int, tpm: int, burst: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, limits in (("rpm", {"rpm": rpm}), ("tpm", {"tpm": tpm})):
        name = f"acc-{kind}-{uuid.uuid4().hex[:6]}"
        key = _admin(replicas[0], "POST", "/admin/tenants", json={"name": name, "adapters": ["*"], **limits}).json()["key"]
        for r in replicas:
            _wait_status(r, key, 200)
        responses = asyncio.run(_burst(replicas, key, burst, 16))
        ok = [r for r in responses if r.status_code == 200]
        codes: dict[str, int] = {}
        for r in responses:
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
        if kind == "rpm":
            out[kind] = {"limit": rpm, "sent": burst, "served": len(ok), "served_over_limit": len(ok) / rpm, "codes": codes}
        else:
            tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
            out[kind] = {"limit": tpm, "sent": burst, "served": len(ok), "served_tokens": tokens,
                         "served_over_limit": tokens / tpm, "codes": codes}
    return out


def table(result: dict[str, Any]) -> str:
    o, p, a, rt = result["overhead"], result["propagation"], result["accuracy"], result["round_trip_ms"]
    lines = [f"# Replicas: shared limits, propagation, accuracy ({result['when']}, commit {result['commit']})", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load average before "
             f"{result['load_before']}, after {result['load_after']}.", "",
             f"One Redis admission alone: p50 {rt['p50']:.2f} ms, p99 {rt['p99']:.2f} ms ({rt['n']} in a row).", "",
             f"| at {o['rate']:g} rps, {len(o['runs']['local'])} rounds alternated | p50 ms | p99 ms | errors |",
             "| --- | --- | --- | --- |"]
    for label in ("local", "shared"):
        runs = o["runs"][label]
        lines.append(f"| limits {'in Redis' if label == 'shared' else 'in process'} (median of rounds) | "
                     f"{statistics.median(r['latency_ms']['p50'] for r in runs):.2f} | "
                     f"{statistics.median(r['latency_ms']['p99'] for r in runs):.2f} | {o['errors'][label]} |")
    lines += [f"| **added by Redis** (median of per-round differences) | **{o['added_ms']['p50']:.2f}** | "
              f"**{o['added_ms']['p99']:.2f}** | |", "",
              f"Propagation over {p['trials']} tenants (3 replicas, measured from the writer's answer to each other "
              f"replica's first agreeing answer, polled every 3 ms): created p50 {p['created_ms']['p50']:.1f} ms, "
              f"p99 {p['created_ms']['p99']:.1f} ms; deleted p50 {p['deleted_ms']['p50']:.1f} ms, "
              f"p99 {p['deleted_ms']['p99']:.1f} ms.", "",
              "| burst over 3 replicas at once | limit | sent | served | served / limit |", "| --- | --- | --- | --- | --- |",
              f"| rpm | {a['rpm']['limit']} | {a['rpm']['sent']} | {a['rpm']['served']} | {a['rpm']['served_over_limit']:.3f} |",
              f"| tpm (tokens served) | {a['tpm']['limit']} | {a['tpm']['sent']} | {a['tpm']['served_tokens']} | "
              f"{a['tpm']['served_over_limit']:.3f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=500.0, help="requests per second of the overhead runs (default 500)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of the overhead runs (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per overhead run (default 10)")
    p.add_argument("--trials", type=int, default=30, help="tenants created and deleted for propagation (default 30)")
    p.add_argument("--rpm", type=int, default=100)
    p.add_argument("--tpm", type=int, default=5000)
    p.add_argument("--burst", type=int, default=600, help="requests in each accuracy burst (default 600)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="salora-replicas-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with ExitStack() as stack:
        pg_root = Path(tempfile.mkdtemp(prefix="salora-postgres-"))
        stack.callback(shutil.rmtree, pg_root, True)
        postgres = Postgres.start(pg_root)
        stack.callback(postgres.stop)
        redis = Redis(workdir / "redis").start()
        stack.callback(redis.stop)
        upstream = start_upstream(stack, workdir)
        print("round trip of one admission ...", file=sys.stderr)
        rt = asyncio.run(round_trip(redis.url, 2000))
        db = postgres.create_database("bench")
        shared = {"db_url": db, "redis_url": redis.url, "state_dir": str(workdir / "shared-state")}
        (workdir / "local").mkdir()
        local = start_replica(stack, workdir / "local", upstream, "local")
        replicas = [start_replica(stack, workdir, upstream, f"replica-{i}", **shared) for i in range(3)]
        result_overhead = overhead(local, replicas[0], args.rate, args.rounds, args.duration)
        local.stop()
        result_propagation = propagation(replicas, args.trials)
        result_accuracy = accuracy(replicas, args.rpm, args.tpm, args.burst)
    result = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "machine": machine(),
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "round_trip_ms": rt, "overhead": result_overhead, "propagation": result_propagation,
              "accuracy": result_accuracy, "args": vars(args) | {"out": str(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stamp}.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
