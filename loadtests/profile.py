"""Profile the gateway under load: py-spy samples the `salora serve` process while the generator
sends a fixed rate through it to the fake upstream. Only samples of a thread holding the GIL count
(`--gil`): in one Python process that is the time that serializes requests. The summary (top functions by own and by
inclusive time, and time per gateway source file) goes to loadtests/profiles/<label>.txt.

py-spy is a dev tool from PyPI (`pip install py-spy`); it needs ptrace on the gateway process,
which a root shell or the process's own user has.

    python -m loadtests.profile --label before --rate 300 --duration 10
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import uvloop

from loadtests.loadgen import Target, Workload, open_loop
from loadtests.stack import ROOT, start_gateway, start_upstream

PROFILES = ROOT / "loadtests" / "profiles"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# The components of the request path, as (name, file marker, function prefix or "" for any). A sample
# goes to the first component met walking up from its leaf frame; frames of no component (asyncio,
# contextlib, copy, typing ...) are skipped, so e.g. `current_task` called by aiohttp is the engine's.
COMPONENTS: tuple[tuple[str, str, str], ...] = (
    ("judge", "salora/judge.py", ""),
    ("metrics", "prometheus_client/", ""),
    ("metrics", "gateway/loop_metrics.py", ""),
    ("pydantic validation", "pydantic", ""),
    ("JSON", "json/", ""),
    ("JSON", "orjson", ""),
    ("auth", "gateway/auth.py", ""),
    ("auth", "gateway/tenants.py", ""),
    ("limits", "gateway/ratelimit.py", ""),
    ("stream slots", "gateway/streams.py", ""),
    ("body limit", "gateway/body_limit.py", ""),
    ("body limit", "fastapi/_body_limit.py", ""),
    ("body limit", "chat_completion/serving.py", "_read_body"),
    ("drain middleware", "gateway/shutdown.py", ""),
    ("request id", "gateway/request_id.py", ""),
    ("engine call (upstream client)", "aiohttp/", ""),
    ("engine call (upstream client)", "yarl/", ""),
    ("engine call (upstream client)", "multidict/", ""),
    ("engine call (upstream client)", "gateway/engines/", ""),
    ("response writing (server)", "uvicorn/protocols/http/", "RequestResponseCycle.send"),
    ("response writing (server)", "gateway/response_head.py", ""),
    ("response writing (server)", "starlette/responses.py", ""),
    ("HTTP parsing (server)", "uvicorn/protocols/http/", ""),
    ("HTTP parsing (server)", "gateway/header_limit.py", ""),
    ("chat handler (gateway)", "gateway/openai/", ""),
    ("chat handler (gateway)", "gateway/", ""),
    ("framework (FastAPI, Starlette, uvicorn)", "starlette/", ""),
    ("framework (FastAPI, Starlette, uvicorn)", "fastapi/", ""),
    ("framework (FastAPI, Starlette, uvicorn)", "uvicorn/", ""),
)
LOOP = "event loop, tasks, other"  # samples of no component: the loop's own scheduling and the rest


def _frame(raw: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame `func (path/file.py:line)`; line numbers dropped so
    a function's samples add up."""
    m = _FRAME.match(raw)
    return (m["func"], m["file"]) if m else (raw, "")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def component(frames: list[tuple[str, str]]) -> str:
    """The request-path component a sample belongs to (`frames` root first, as py-spy writes them)."""
    for func, file in reversed(frames):
        for name, marker, prefix in COMPONENTS:
            if marker in file and func.startswith(prefix):
                return name
    return LOOP


def components(collapsed: str) -> dict[str, float]:
    """Each component's share of the samples (0..1), largest first."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            counts[component([_frame(f) for f in stack.split(";")])] += int(count_text)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in counts.most_common()}


def component_table(shares: dict[str, float], cpu_ms_per_request: float) -> str:
    """Markdown: each component's share of the samples and its CPU per request, the process's
    measured CPU per request split by those shares."""
    rows = [f"| {name} | {100 * share:.1f}% | {1000 * share * cpu_ms_per_request:.0f} |" for name, share in shares.items()]
    return "\n".join(["| component | share of GIL samples | CPU per request, µs |", "| --- | ---: | ---: |", *rows,
                      f"| **all (measured)** | 100% | {1000 * cpu_ms_per_request:.0f} |"])


def summarize(collapsed: str, top: int = 30) -> str:
    """A text report of py-spy's collapsed stacks (`frame;frame;... count` per line)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        names = [f"{func} ({_short(file)})" for func, file in frames]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
        gateway_files = {_short(file) for _, file in frames if "gateway/" in file and "site-packages" not in file}
        for file in gateway_files:
            by_file[file] += count
    if total == 0:
        return "no samples\n"

    def block(title: str, counter: Counter[str]) -> str:
        rows = [f"{100 * n / total:6.1f}%  {name}" for name, n in counter.most_common(top)]
        return f"{title}\n" + "\n".join(rows)

    # The call chain down to the event loop is in (nearly) every sample and says nothing.
    inclusive = Counter({name: n for name, n in inclusive.items() if n < 0.98 * total})

    return "\n\n".join([f"samples: {total} (threads holding the GIL only)", block("own time (leaf frame)", own),
                        block("inclusive time (below the event loop)", inclusive), block("inclusive time by gateway file", by_file)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="name of the summary file, e.g. before or after")
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--sample-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--source", type=Path, default=ROOT, help="the gateway's code (default: this checkout)")
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="salora-profile-"))
    raw = workdir / "profile.txt"
    with ExitStack() as stack:
        upstream = start_upstream(stack, workdir)
        gateway = start_gateway(stack, workdir, upstream, source=args.source.resolve())
        target, workload = Target(gateway.url, gateway.model, gateway.key), Workload(stream=args.stream)
        uvloop.run(open_loop(target, workload, 50, 2))  # warm-up, not profiled
        spy = subprocess.Popen([py_spy, "record", "--pid", str(gateway.proc.pid), "--duration", str(int(args.duration)),
                                "--rate", str(args.sample_rate), "--gil", "--nonblocking", "--format", "raw",
                                "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before = {s.name: s.cpu_seconds() for s in (gateway, upstream)}
        load = os.getloadavg()[0]
        run = uvloop.run(open_loop(target, workload, args.rate, args.duration))
        cpu = {s.name: 1000 * (s.cpu_seconds() - cpu_before[s.name]) / max(1, run["ok"]) for s in (gateway, upstream)}
        spy.wait(timeout=60)
    lat = run["latency_ms"] or {}
    collapsed = raw.read_text()
    head = (f"gateway under {args.rate:g} req/s {'streaming' if args.stream else 'non-streaming'} for {args.duration:g} s "
            f"(py-spy at {args.sample_rate} Hz, --nonblocking; latencies here are not the benchmark's)\n"
            f"completed {run['ok']}, errors {run['errors']}, p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms\n"
            f"CPU per request: gateway {cpu['gateway']:.3f} ms, fake upstream {cpu['upstream']:.3f} ms "
            f"(ratio {cpu['gateway'] / max(cpu['upstream'], 1e-9):.2f}); load average (1 min) at the start {load:.2f}\n\n"
            f"By component (the gateway's measured CPU per request split by its share of the samples):\n\n"
            f"{component_table(components(collapsed), cpu['gateway'])}\n\n")
    PROFILES.mkdir(parents=True, exist_ok=True)
    out = PROFILES / f"{args.label}.txt"
    out.write_text(head + summarize(collapsed))
    print(out.read_text())


if __name__ == "__main__":
    main()
