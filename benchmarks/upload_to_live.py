"""Upload-to-live time of an adapter on the embedded model: a real gateway (in process, over
HTTP), the default canary probe sets, the default engine settings. The clock runs from the start of
the upload to the moment the admin API reports the adapter live (validated, stored, hot-loaded, probed
against the base, promoted). Measured twice on one gateway: `cold`, when the base model's probe answers
are not cached yet (a fresh base or probe set), and `warm`, the usual case, when they are.

    [OMP_NUM_THREADS=1] .venv/bin/python benchmarks/upload_to_live.py [--adapter DIR] [--rank 8]
        [--targets q_proj,...] [--concurrency N] [--max-batch-size N] [--out FILE]

Without `--adapter` it uploads LoRAs (default rank 8 on all seven projections) with small random B
(answers close to the base's, as a passing adapter's are). The goal (issue 19): the warm run within
15 s on this machine (issue 5's was 60 s for rank 16 on q_proj and v_proj).
On a machine shared with other jobs, `OMP_NUM_THREADS=1` avoids oversubscribing the cores, which
otherwise slows decoding several times over; the thread count and the load average before and after
are recorded with the result.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import threading
import time
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import httpx
import torch
import uvicorn
from peft import LoraConfig, get_peft_model

from gateway.app import create_app
from gateway.canary.probes import select_probes
from gateway.settings import Settings
from salora.models import EMBEDDED, load_model

ADMIN_KEY = "benchmark-admin-key"
GOAL_S = 15.0  # issue 19, for the warm run (the base's answers cached)
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def synthetic_adapter(out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    torch.manual_seed(seed)
    model, _ = load_model(EMBEDDED)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1e-3)
    peft.save_pretrained(out)
    return out


def archive(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


def upload_to_live(http: httpx.Client, name: str, data: bytes) -> dict:
    started = time.perf_counter()
    r = http.post("/admin/adapters", data={"name": name}, files=[("file", (f"{name}.tar.gz", data))])
    accepted = time.perf_counter() - started
    if r.status_code != 202:
        raise SystemExit(f"upload of {name} refused: {r.status_code} {r.text}")
    while True:
        detail = http.get(f"/admin/adapters/{name}").json()
        if detail["state"] in ("live", "rejected") and not detail["canary_running"]:
            break
        time.sleep(0.05)
    total = time.perf_counter() - started
    run = detail["canary"]
    canary_s = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds()
    return {"state": detail["state"], "upload_to_live_s": round(total, 2), "accepted_s": round(accepted, 2),
            "canary_s": round(canary_s, 2), "rank": detail["rank"], "base_cached": detail["report"]["base_cached"],
            "timings_s": detail["report"].get("timings_s"), "early_stop": detail["report"].get("early_stop"),
            "rates": run["rates"], "reasons": run["reasons"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, help="a PEFT adapter directory to upload (twice: cold, warm)")
    ap.add_argument("--rank", type=int, default=8, help="of the synthetic adapters")
    ap.add_argument("--targets", default=ALL_PROJECTIONS, help="modules of the synthetic adapters")
    ap.add_argument("--concurrency", type=int, help="canary.concurrency (probes in flight; default: the setting's)")
    ap.add_argument("--max-batch-size", type=int, help="the local engine's max_batch_size (default: the setting's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "upload_to_live.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.adapter:
            adapters = [args.adapter] * 2
        else:  # in a child process: torch work on a thread of the gateway's process slows its engine (LocalEngine.start)
            with get_context("spawn").Pool(1) as pool:
                adapters = pool.starmap(synthetic_adapter, [(tmp_path / f"a{i}", i, args.rank, args.targets.split(","))
                                                            for i in range(2)])
        overrides: dict = {}
        if args.concurrency:
            overrides["canary"] = {"concurrency": args.concurrency}
        if args.max_batch_size:
            overrides["max_batch_size"] = args.max_batch_size
        settings = Settings(model=EMBEDDED, admin_key=ADMIN_KEY, state_dir=tmp_path / "state", **overrides)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600) as http:
            while http.get("/readyz").status_code != 200:
                time.sleep(0.1)
            runs = {"cold": upload_to_live(http, "bench-cold", archive(adapters[0])),
                    "warm": upload_to_live(http, "bench-warm", archive(adapters[1]))}
        server.should_exit = True
        thread.join(timeout=60)
    probes = select_probes(settings.canary)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "probes": {"harmful": sum(p.set == "harmful" for p in probes), "benign": sum(p.set == "benign" for p in probes),
                   "max_new_tokens": settings.canary.max_new_tokens, "concurrency": settings.canary.concurrency,
                   "max_batch_size": settings.max_batch_size},
        "goal_s": GOAL_S,
        **runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for label, run in runs.items():
        verdict = "within" if run["upload_to_live_s"] <= GOAL_S else "OVER"  # the goal is the warm run's
        print(f"{label}: {run['state']} after {run['upload_to_live_s']:.1f} s (202 after {run['accepted_s']:.2f} s, "
              f"canary {run['canary_s']:.1f} s: {run['timings_s']}, stopped early {run['early_stop']}) - {verdict} the "
              f"{GOAL_S:.0f} s goal")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
