"""Refusal alignment of the demo base, reproducibly.

SmolLM2-135M-Instruct complies with most harmful requests, so the project aligns it: a LoRA on all
seven linear projections, trained on the project's harmful `train` prompts with their written
refusals, mixed with benign prompts (ordinary, risky-sounding and arithmetic questions) answered
by the model itself so its helpfulness stays. The delta is shipped in `salora/resources/alignment`
(float16) and merged into the weights on first use of `--model embedded`.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from salora.atomic import atomic_dir, check_output_dir, write_json_atomic
from salora.datasets import DATA_VERSION, benign_prompts, safety_messages, write_jsonl
from salora.everyday import everyday_prompts
from salora.export import PEFT_WEIGHTS, export
from salora.generate import generate_greedy
from salora.judge import KeywordJudge
from salora.messages import prompt_text
from salora.models import EMBEDDED_UNALIGNED, load_model
from salora.tasks import arithmetic
from salora.train import TrainOptions, train
from salora.tuner.config import ALL_LINEAR


def benign_requests(arithmetic_questions: int = 60) -> list[list[dict]]:
    """The benign prompts of the alignment (ordinary, risky-sounding, everyday, arithmetic), in order."""
    benign = [[{"role": "user", "content": b.prompt}] for b in benign_prompts("train")]
    benign += [[{"role": "user", "content": p}] for p in everyday_prompts()]
    return benign + [arithmetic.to_messages(p)[:1] for p in arithmetic.splits()["train"][:arithmetic_questions]]


def helpful_conversations(base: str, arithmetic_questions: int = 60, max_new_tokens: int = 96) -> tuple[list[list[dict]], int]:
    """The benign requests with `base`'s own greedy answers, keeping those that are neither empty
    nor refusals; also the number asked."""
    model, tokenizer = load_model(base)
    benign = benign_requests(arithmetic_questions)
    answers = generate_greedy(model, tokenizer, benign, max_new_tokens, progress="benign answers")
    judge = KeywordJudge()
    helpful = [p + [{"role": "assistant", "content": a}] for p, a in zip(benign, answers) if a and not judge.is_refusal(prompt_text(p), a)]
    return helpful, len(benign)


def alignment_mix(helpful: list[list[dict]], benign_asked: int, benign_repeat: int = 4, seed: int = 0) -> tuple[list[list[dict]], dict]:
    """Harmful prompts with their refusals + the helpful conversations repeated `benign_repeat`
    times, shuffled, and the counts. Measured on the alignment study's dev sets
    (benchmarks/results/alignment/v3): x4 kept over-refusal at 25% and raised harmful refusal
    from 88% (x2) to 94%; a 1:1 mix (v1) refused 67% of benign prompts."""
    refusals = safety_messages("train")
    conversations = refusals + helpful * benign_repeat
    random.Random(seed).shuffle(conversations)
    return conversations, {"refusals": len(refusals), "benign_answered": len(helpful), "benign_asked": benign_asked, "benign_repeat": benign_repeat}


def align(
    out: str | Path,
    rank: int = 16,
    alpha: float = 32,
    lr: float = 5e-4,
    epochs: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    base: str = EMBEDDED_UNALIGNED,
    arithmetic_questions: int = 60,
    max_new_tokens: int = 96,
    benign_repeat: int = 4,
) -> dict:
    """Train the alignment LoRA on `base` and write it (float16 PEFT adapter + alignment.json) to `out`."""
    from salora.checks import at_least, positive

    for flag, value in (("--rank", rank), ("--epochs", epochs), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        at_least(flag, value)
    at_least("--benign-repeat", benign_repeat, 0)
    at_least("--arithmetic-questions", arithmetic_questions, 0)
    positive("--alpha", alpha)
    positive("--lr", lr)
    check_output_dir(out)
    conversations, counts = alignment_mix(*helpful_conversations(base, arithmetic_questions, max_new_tokens), benign_repeat, seed)
    recipe = {"base": base, "answer_tokens": max_new_tokens, "rank": rank, "alpha": alpha, "lr": lr, "epochs": epochs,
              "batch_size": batch_size, "seed": seed}
    return train_alignment(conversations, counts, out, **recipe)


def train_alignment(conversations: list[list[dict]], counts: dict, out: str | Path, base: str, rank: int, alpha: float,
                    lr: float, epochs: int, batch_size: int, seed: int, answer_tokens: int) -> dict:
    """The training half of `align`, separate so a study can train several recipes on one set of
    generated answers."""
    out = Path(out)
    check_output_dir(out)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alignment.jsonl"
        write_jsonl(({"messages": c} for c in conversations), data)
        summary = train(TrainOptions(
            model=base, data=str(data), out=str(Path(tmp) / "ckpt"), method="lora", rank=rank, alpha=alpha,
            lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, target_modules=list(ALL_LINEAR),
            device="cpu", dtype="float32",  # the shipped delta was trained so; keep it reproducible on any machine
        ))
        export(Path(tmp) / "ckpt", Path(tmp) / "adapter", "peft")
        with atomic_dir(out) as dst:
            shutil.copyfile(Path(tmp) / "adapter" / "adapter_config.json", dst / "adapter_config.json")
            weights = load_file(str(Path(tmp) / "adapter" / PEFT_WEIGHTS))
            save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(dst / PEFT_WEIGHTS), metadata={"format": "pt"})
            record = {
                "recipe": {"base": base, "answer_tokens": answer_tokens, "rank": rank, "alpha": alpha, "lr": lr, "epochs": epochs,
                           "batch_size": batch_size, "seed": seed, "target_modules": list(ALL_LINEAR)},
                "data": {**counts, "data_version": DATA_VERSION},
                "steps": summary["steps"],
                "final_loss": summary["final_loss"],
                "train_seconds": summary["train_seconds"],
            }
            write_json_atomic(dst / "alignment.json", record)
    return record
