"""Training step time of SaLoRA vs plain PEFT LoRA vs a dense-C reference layer on the embedded
SmolLM2-135M-Instruct, measured side by side (interleaved rounds, same batch), printed as ratios;
plus the time of `calibrate` with 128 samples.

    .venv/bin/python benchmarks/train_speed.py [--rounds 12] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from salora.calibrate import calibrate, load_safety, module_bases, record_input_moments
from salora.chat import collate, tokenize_chat
from salora.datasets import safety_messages, write_jsonl
from salora.models import EMBEDDED, linear_modules, load_model
from salora.tasks import arithmetic
from salora.tuner import SaLoRAConfig, SaLoRALinear, inject_salora, salora_layers
from salora.tuner.config import PAPER_TARGETS


class DenseCLinear(SaLoRALinear):
    """The reference code's form: every token's adapter output multiplied by a dense d_out x d_out C."""

    def __init__(self, layer: SaLoRALinear) -> None:
        super().__init__(layer.base, layer.A0, layer.B0, layer.V, layer.scale)
        V = layer.V
        self.register_buffer("C", torch.eye(V.shape[0]) - V @ V.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(F.linear(x, self.A), self.B), self.C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "safety.jsonl"
        write_jsonl([{"messages": m} for m in safety_messages("train")[:128]], data)
        t0 = time.perf_counter()
        meta = calibrate(EMBEDDED, data, Path(tmp) / "safety", PAPER_TARGETS, rank_safety=32, max_samples=128)
        calibrate_s = time.perf_counter() - t0
        print(f"calibrate: {calibrate_s:.1f}s for {meta['sequences']} sequences, {meta['response_tokens']} response tokens")

        task = [arithmetic.to_messages(p) for p in arithmetic.splits()["train"][:128]]
        models = {}
        base, tokenizer = load_model(EMBEDDED)
        models["lora"] = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=PAPER_TARGETS, lora_dropout=0.0))
        for kind in ("salora", "dense_c"):
            model, _ = load_model(EMBEDDED)
            modules = linear_modules(model, PAPER_TARGETS)
            safety, _ = load_safety(Path(tmp) / "safety", modules)
            task_bases, _ = module_bases(modules, record_input_moments(model, tokenizer, task, modules), 32)
            inject_salora(model, modules, SaLoRAConfig(rank=args.rank, target_modules=PAPER_TARGETS, init="task", projection="output"), safety, task_bases)
            if kind == "dense_c":
                for name, layer in salora_layers(model).items():
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, DenseCLinear(layer))
            models[kind] = model

    batch = collate([tokenize_chat(tokenizer, m, 512) for m in task[: args.batch_size]], tokenizer.pad_token_id)
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}

    def step(kind: str) -> float:
        t = time.perf_counter()
        models[kind](**batch).loss.backward()
        optimizers[kind].step()
        optimizers[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for kind in models:  # warm-up
        step(kind), step(kind)
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for kind in (list(models) if r % 2 == 0 else list(reversed(models))):
            times[kind].append(step(kind))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {args.batch_size} x {batch['input_ids'].shape[1]} tokens, rank {args.rank}, targets {PAPER_TARGETS}, {args.rounds} interleaved rounds")
    for kind, t in median.items():
        print(f"  {kind:8s} median step {t:.3f}s  ({t / median['lora']:.3f}x LoRA)")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "command": "benchmarks/train_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "median_step_s": median,
        "salora_over_lora": median["salora"] / median["lora"],
        "dense_c_over_lora": median["dense_c"] / median["lora"],
        "calibrate_128_s": calibrate_s,
        "calibrate_response_tokens": meta["response_tokens"],
    }
    out = Path(__file__).parent / "results" / f"train_speed-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"SaLoRA / LoRA = {result['salora_over_lora']:.3f} (goal <= 1.05); dense-C / LoRA = {result['dense_c_over_lora']:.3f} -> {out}")


if __name__ == "__main__":
    main()
