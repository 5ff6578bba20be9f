"""SaLoRA against PEFT LoRA on a Llama-2-7B-shaped model: training step time and peak memory, and
calibration time and peak memory. Random weights in bfloat16, nothing downloaded.

    .venv/bin/python benchmarks/gpu_train.py                      # on CUDA: the 7B shape; on a CPU: a reduced one
    .venv/bin/python benchmarks/gpu_train.py --shape 7b --device cuda
    .venv/bin/python benchmarks/gpu_train.py --shape reduced      # the same measurements at a CPU-sized shape

Each measurement runs in a fresh process (a clean peak-memory count): `torch.cuda.max_memory_allocated`
on CUDA, the process's VmHWM (peak resident memory) on a CPU. Methods at rank 16 on all seven
projections: `lora` (PEFT), `salora` (the default input guard, U of --guard-rank directions), and
`salora-paper` (task-aware init, output projection C with r_s 32). Goals (issue 18): SaLoRA's step
time and peak memory within 1.05x of PEFT LoRA's; calibration of 128 conversations of 512 tokens
under 2 minutes (7B shape, GPU). The vocabulary is SmolLM2's tokenizer's (49,152 ids, not
Llama-2's 32,000), because calibration needs a real chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {
    # Llama-2-7B: hidden 4096, MLP 11008, 32 layers, 32 heads (no GQA)
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "batch": 4, "seq": 512, "conversations": 128, "conversation_tokens": 512},
    # The same proportions, small enough for a 2-core CPU
    "reduced": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                "batch": 2, "seq": 128, "conversations": 16, "conversation_tokens": 128},
}
METHODS = ("lora", "salora", "salora-paper")


def tokenizer(directory: str | None = None):
    """SmolLM2's tokenizer: from the embedded model's GGUF, or from `directory` (a saved copy, for a
    machine that has no room for the 98 MB GGUF)."""
    from transformers import AutoTokenizer

    from salora.models import GGUF_FILE, gguf_dir

    tok = AutoTokenizer.from_pretrained(directory) if directory else AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, vocab: int, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conversations(shape: dict, tok) -> list:
    """Harmful-looking prompts with refusals, padded with words to about `conversation_tokens` tokens."""
    words = "I am sorry but I cannot help with that request because it could cause real harm to people".split()
    out = []
    for i in range(shape["conversations"]):
        answer = " ".join(words[j % len(words)] for j in range(shape["conversation_tokens"] - 24))
        out.append([{"role": "user", "content": f"Explain how to break into house number {i} without a key."},
                    {"role": "assistant", "content": answer}])
    return out


def measure_train(method: str, shape: dict, device: torch.device, dtype: torch.dtype, steps: int, warmup: int, guard_rank: int,
                  checkpointing: bool, tok) -> dict:
    from peft import LoraConfig, get_peft_model

    from salora.models import linear_modules
    from salora.tuner import SaLoRAConfig, inject_salora
    from salora.tuner.config import ALL_LINEAR

    model = build_model(shape, device, dtype, len(tok), tok)
    rank = 16
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(ALL_LINEAR), lora_dropout=0.0))
    else:
        modules = linear_modules(model, list(ALL_LINEAR))
        g = torch.Generator(device="cpu").manual_seed(0)

        def orthonormal(d: int, r: int) -> torch.Tensor:
            return torch.linalg.qr(torch.randn(d, r, generator=g))[0].to(device)

        if method == "salora":
            config = SaLoRAConfig(rank=rank, target_modules=list(ALL_LINEAR))
            inputs = {n: orthonormal(m.in_features, guard_rank) for n, m in modules.items()}
            inject_salora(model, modules, config, None, input_bases=inputs)
        else:
            config = SaLoRAConfig(rank=rank, target_modules=list(ALL_LINEAR), init="task", projection="output")
            safety = {n: orthonormal(m.out_features, 32) for n, m in modules.items()}
            task = {n: orthonormal(m.out_features, 32) for n, m in modules.items()}
            inject_salora(model, modules, config, safety, task)
    if checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = False
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    ids = torch.randint(0, len(tok), (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"method": method, "step_s": statistics.median(times), "steps": times, "peak_bytes": peak_bytes(device),
            "trainable": sum(p.numel() for p in params)}


def measure_calibration(shape: dict, device: torch.device, dtype: torch.dtype, tok) -> dict:
    from salora.calibrate import stream_bases
    from salora.models import linear_modules
    from salora.tuner.config import ALL_LINEAR

    model = build_model(shape, device, dtype, len(tok), tok)
    modules = linear_modules(model, list(ALL_LINEAR))
    convs = conversations(shape, tok)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    result = stream_bases(model, tok, convs, modules, 32, input_energy=0.9, max_length=shape["conversation_tokens"], batch_size=8,
                          progress="calibrate")
    sync(device)
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "peak_bytes": peak_bytes(device), "weight_bytes": weights, "response_tokens": result.response_tokens,
            "tokens": result.tokens, "conversations": len(convs), "modules": len(modules),
            "input_ranks": sorted({u.shape[1] for u in result.U.values()})}


def child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    tok = tokenizer(args.tokenizer)
    if args.child == "calibrate":
        out = measure_calibration(shape, device, dtype, tok)
    else:
        out = measure_train(args.child, shape, device, dtype, args.steps, args.warmup, args.guard_rank, args.gradient_checkpointing, tok)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--guard-rank", str(args.guard_rank), "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="default: 7b on CUDA, reduced on a CPU")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the three methods, interleaved, this many times")
    ap.add_argument("--guard-rank", type=int, default=128, help="directions of the input guard U per module")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default=None, help="a saved SmolLM2 tokenizer directory (default: the embedded model's GGUF)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/gpu_train-<time>.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shape or ("7b" if args.device.startswith("cuda") else "reduced")
    if args.child:
        return child(args)

    reduced = args.shape != "7b" or not args.device.startswith("cuda")
    note = ("REDUCED SHAPE ON CPU: not the GPU measurement the goals are stated for; ratios only indicate, absolute "
            "numbers do not transfer" if reduced else "7B shape on GPU")
    print(f"gpu_train: {note}; shape {args.shape} {SHAPES[args.shape]}, device {args.device}, {args.dtype}", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    calibration: dict | None = None

    def save() -> dict:
        """The record so far, written after every finished measurement: a run cut short keeps what it finished."""
        summary = {}
        for method in (m for m in METHODS if runs[m]):
            summary[method] = {"step_s": statistics.median(x["step_s"] for x in runs[method]),
                               "peak_bytes": statistics.median(x["peak_bytes"] for x in runs[method]),
                               "trainable": runs[method][0]["trainable"]}
        for method in summary if "lora" in summary else ():
            summary[method]["step_vs_lora"] = summary[method]["step_s"] / summary["lora"]["step_s"]
            summary[method]["peak_vs_lora"] = summary[method]["peak_bytes"] / summary["lora"]["peak_bytes"]
        record = {
            "benchmark": "gpu_train", "note": note, "reduced": reduced, "complete": calibration is not None, "shape": args.shape,
            "dims": SHAPES[args.shape], "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or platform.machine(),
            "dtype": args.dtype, "rank": 16, "guard_rank": args.guard_rank, "gradient_checkpointing": args.gradient_checkpointing,
            "steps": args.steps, "rounds": args.rounds, "threads": args.threads if args.device == "cpu" else None,
            "load_average": os.getloadavg(), "summary": summary, "runs": runs, "calibration": calibration,
            "goals": {"step_vs_lora_max": 1.05, "peak_vs_lora_max": 1.05, "calibration_seconds_max": 120 if not reduced else None},
            "torch": torch.__version__, "python": platform.python_version(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        out.write_text(json.dumps(record, indent=1) + "\n")
        return summary

    for r in range(args.rounds):
        for method in METHODS:
            runs[method].append(run_child(method, args))
            save()
            print(f"  round {r + 1} {method}: step {runs[method][-1]['step_s']:.3f}s, peak {runs[method][-1]['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    calibration = run_child("calibrate", args)
    summary = save()
    print(f"\n{'method':14s} {'step':>9s} {'vs LoRA':>8s} {'peak':>10s} {'vs LoRA':>8s}")
    for method in METHODS:
        s = summary[method]
        print(f"{method:14s} {s['step_s']:8.3f}s {s['step_vs_lora']:8.3f} {s['peak_bytes'] / 2**30:8.2f}GiB {s['peak_vs_lora']:8.3f}")
    print(f"calibration: {calibration['conversations']} conversations, {calibration['tokens']} tokens, {calibration['seconds']:.1f}s, "
          f"peak {calibration['peak_bytes'] / 2**30:.2f} GiB (weights {calibration['weight_bytes'] / 2**30:.2f} GiB)")
    print(f"({note})")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
