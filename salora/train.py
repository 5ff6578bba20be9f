"""Chat SFT of a SaLoRA adapter (or a plain PEFT LoRA baseline) with the loss on assistant tokens.

A checkpoint directory holds `salora_config.json` (what was trained, on which base) and either
`salora_adapter.safetensors` (SaLoRA: A, B, A0, B0, V per module) or a PEFT adapter (LoRA).
`salora export` turns either into a standard PEFT adapter or a merged model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tqdm.auto import tqdm

from salora.atomic import atomic_dir, check_output_dir, write_json_atomic
from salora.calibrate import SAFETY_META, check_rank, load_safety, module_bases, record_input_moments
from salora.chat import collate, read_chat_jsonl, tokenize_chat
from salora.errors import SaLoRAError
from salora.models import linear_modules, load_model, model_id, weight_hash
from salora.tuner.config import ALL_LINEAR, SaLoRAConfig
from salora.tuner.model import inject_salora, salora_layers, salora_state

CHECKPOINT_CONFIG = "salora_config.json"
SALORA_WEIGHTS = "salora_adapter.safetensors"
TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainOptions:
    model: str
    data: str
    out: str
    safety: str | None = None
    method: str = "salora"
    rank: int = 16
    alpha: float | None = None
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    seed: int = 0
    target_modules: list[str] | None = None
    init: str = "zero"
    projection: str = "input"
    task_rank: int = 32
    task_samples: int = 128
    max_length: int = 512
    save_every: int | None = None
    extra: dict = field(default_factory=dict)


def _targets(opts: TrainOptions) -> list[str]:
    if opts.target_modules:
        return opts.target_modules
    if opts.safety and (Path(opts.safety) / SAFETY_META).is_file():
        return json.loads((Path(opts.safety) / SAFETY_META).read_text())["target_modules"]
    return list(ALL_LINEAR)


def _validate(opts: TrainOptions) -> None:
    if opts.method not in ("salora", "lora"):
        raise SaLoRAError(f"--method must be salora or lora, not {opts.method}")
    if opts.method == "salora" and opts.projection != "none" and not opts.safety:
        raise SaLoRAError("--method salora needs --safety DIR (from `salora calibrate`)")
    for name, value in (("--rank", opts.rank), ("--batch-size", opts.batch_size), ("--epochs", opts.epochs)):
        if value < 1:
            raise SaLoRAError(f"{name} must be at least 1")
    if opts.max_steps is not None and opts.max_steps < 0:
        raise SaLoRAError("--max-steps must not be negative")
    if opts.lr <= 0:
        raise SaLoRAError("--lr must be positive")


def train(opts: TrainOptions) -> dict:
    """Train and write the checkpoint directory atomically; returns the run summary."""
    _validate(opts)
    out = Path(opts.out)
    check_output_dir(out)
    conversations = read_chat_jsonl(opts.data)
    torch.manual_seed(opts.seed)
    model, tokenizer = load_model(opts.model)
    targets = _targets(opts)
    modules = linear_modules(model, targets)
    check_rank(modules, opts.rank, "--rank")
    base_hash = weight_hash(modules)
    config = SaLoRAConfig(
        rank=opts.rank, alpha=opts.alpha, target_modules=targets, init=opts.init, task_rank=opts.task_rank, projection=opts.projection
    )
    if opts.method == "salora":
        safety, input_bases = load_safety(opts.safety, modules) if opts.safety else (None, None)
        if opts.projection in ("input", "both") and input_bases is None:
            raise SaLoRAError(
                f"--projection {opts.projection} needs an input guard in the safety basis, and {opts.safety} has none: calibrate "
                "with --input-energy (on by default; --preset paper turns it off), or train with --preset paper or --projection output"
            )
        task_bases = None
        if config.init in ("task", "task-scaled"):
            check_rank(modules, config.task_rank, "--task-rank")
            moments = record_input_moments(model, tokenizer, conversations[: opts.task_samples], modules, opts.max_length, progress="task basis")
            task_bases, _ = module_bases(modules, moments, config.task_rank)
        inject_salora(model, modules, config, safety, task_bases, seed=opts.seed, input_bases=input_bases)
    else:
        model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=opts.alpha or opts.rank, target_modules=targets, lora_dropout=0.0))

    examples = [tokenize_chat(tokenizer, c, opts.max_length) for c in conversations]
    steps_per_epoch = math.ceil(len(examples) / opts.batch_size)
    total_steps = opts.max_steps if opts.max_steps is not None else opts.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    rng = random.Random(opts.seed)
    meta = {
        "method": opts.method,
        "base_model": opts.model,
        "base_model_id": model_id(opts.model),
        "base_weight_hash": base_hash,
        "salora": config.to_dict(),
        "safety": str(opts.safety) if opts.safety else None,
        "options": asdict(opts),
    }

    def save(directory: Path, step: int, log: list[dict]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if opts.method == "salora":
            save_file(salora_state(salora_layers(model)), str(directory / SALORA_WEIGHTS))
        else:
            model.save_pretrained(directory)
        write_json_atomic(directory / CHECKPOINT_CONFIG, {**meta, "step": step, "final_loss": log[-1]["loss"] if log else None})

    log: list[dict] = []
    model.train()
    started = time.perf_counter()
    with atomic_dir(out) as tmp, (tmp / TRAIN_LOG).open("w") as log_file:
        step, order = 0, []
        bar = tqdm(total=total_steps, desc=f"train {opts.method}", unit="step")
        while step < total_steps:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch_ids, order = order[: opts.batch_size], order[opts.batch_size :]
            batch = collate([examples[i] for i in batch_ids], tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            entry = {"step": step, "epoch": (step - 1) // steps_per_epoch + 1, "loss": loss.item(), "seconds": round(time.perf_counter() - started, 3)}
            log.append(entry)
            log_file.write(json.dumps(entry) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if opts.save_every and step % opts.save_every == 0 and step < total_steps:
                save(tmp / "checkpoints" / f"step-{step}", step, log)
        bar.close()
        model.eval()
        meta["train_seconds"] = round(time.perf_counter() - started, 3)
        meta["steps"] = step
        save(tmp, step, log)
    return {**meta, "final_loss": log[-1]["loss"] if log else None}
