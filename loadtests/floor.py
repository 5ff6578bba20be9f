"""The floor of a proxy: what forwarding alone costs, next to the gateway, in one run.

`bare` is uvicorn (httptools, uvloop) with a raw ASGI app that posts each chat body to the fake
upstream over the gateway's own lean client (`gateway/engines/http1.PostPool`) and sends the answer
back: a second process and socket hop, no auth, limits, validation, metrics or anything else. The
same open-loop load goes to the upstream directly, to `bare` and to the gateway, alternating, so the
gateway's CPU per request splits into what any proxy pays (`bare` over `direct`) and what its own
controls and handler cost (gateway over `bare`), each a ratio measured side by side.

    python -m loadtests.floor --rate 500 --duration 5 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import uvloop

from loadtests.bench import measure
from loadtests.loadgen import Target, Workload, open_loop
from loadtests.stack import ROOT, Service, free_port, start_gateway, start_upstream

Scope = dict[str, Any]
HEADERS = [(b"content-type", b"application/json")]


def bare_app(upstream: str) -> Any:
    """The bare proxy's ASGI app: every POST body to `upstream` + the request's path, the answer back."""
    from gateway.engines.http1 import PostPool

    pool = PostPool(limit=1000, keepalive_s=4, connect_timeout_s=5, read_timeout_s=60)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, content = (await pool.post(upstream + scope["path"], body, 60) if scope["method"] == "POST"
                           else (200, b""))
        await send({"type": "http.response.start", "status": status,
                    "headers": [*HEADERS, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return app


def start_bare(stack: ExitStack, workdir: Path, upstream: Service) -> Service:
    port = free_port()
    log = workdir / "bare.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loadtests.floor", "serve", "--port", str(port), "--upstream",
                                 upstream.url], cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    service = Service("bare", proc, f"http://127.0.0.1:{port}", upstream.model, None, log)
    stack.callback(service.stop)
    service.wait_ready("/health", 30)
    return service


async def _rounds(services: dict[str, Service], upstream: Service, rate: float, duration_s: float,
                  rounds: int) -> dict[str, list[dict[str, float]]]:
    workload = Workload(stream=False)
    everyone = [upstream, *(s for name, s in services.items() if name != "direct")]
    for s in services.values():  # warm-up: connections, first-use imports
        await open_loop(Target(s.url, s.model, s.key), workload, 50, 2)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in services}
    for i in range(rounds):
        for name in (list(services) if i % 2 == 0 else list(reversed(services))):
            run = await measure(services[name], everyone, workload, rate=rate, duration_s=duration_s)
            cpu = run["cpu_ms_per_request"]
            own = cpu["upstream" if name == "direct" else name]
            rows[name].append({"cpu_ms": own, "ratio": own / max(cpu["upstream"], 1e-9), "errors": run["errors"],
                               "load_avg_1m": run["load_avg_1m"][1]})
            await asyncio.sleep(0.5)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.floor", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the bare proxy alone")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if args.command == "serve":
        import uvicorn

        uvicorn.run(bare_app(args.upstream), host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                    loop="uvloop", http="httptools", lifespan="off")
        return
    workdir = Path(tempfile.mkdtemp(prefix="salora-floor-"))
    with ExitStack() as stack:
        upstream = start_upstream(stack, workdir)
        services = {"direct": upstream, "bare": start_bare(stack, workdir, upstream),
                    "gateway": start_gateway(stack, workdir, upstream)}
        rows = uvloop.run(_rounds(services, upstream, args.rate, args.duration, args.rounds))
    loads = [r["load_avg_1m"] for rs in rows.values() for r in rs]
    print(f"{args.rate:g} req/s non-streamed, {args.duration:g} s x {args.rounds} rounds, alternating; load average "
          f"(1 min) {min(loads):.1f}-{max(loads):.1f}")
    print("| target | CPU ms/req, median (range) | over the upstream's, same run: median (range) | errors |")
    print("| --- | ---: | ---: | ---: |")
    for name, rs in rows.items():
        cpu, ratio = [r["cpu_ms"] for r in rs], [r["ratio"] for r in rs]
        print(f"| {name} | {statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}) | "
              f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) | {sum(r['errors'] for r in rs)} |")


if __name__ == "__main__":
    main()
