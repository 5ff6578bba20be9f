"""Safety (and task) bases: top output directions of each target module on response tokens.

One pass over the data with forward hooks on all target modules at once accumulates each
module's input second moment X^T X (float64, d_in x d_in). The right singular vectors of
Y = X W^T are the eigenvectors of Y^T Y = W (X^T X) W^T, so V is exact, not a randomised
estimate, and memory does not grow with the number of tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from salora.atomic import atomic_dir, check_output_dir, write_json_atomic
from salora.chat import IGNORE, Messages, collate, prompt_text, read_chat_jsonl, tokenize_chat
from salora.errors import SaLoRAError
from salora.generate import generate_greedy
from salora.judge import Judge, KeywordJudge
from salora.models import linear_modules, load_model, model_id, weight_hash

SAFETY_TENSORS = "safety.safetensors"
SAFETY_META = "safety.json"


@dataclass
class Moments:
    """Accumulated X^T X over response tokens at one module's input."""

    xtx: torch.Tensor
    tokens: int = 0


@torch.inference_mode()
def record_input_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
    modules: dict[str, nn.Linear],
    max_length: int = 512,
    batch_size: int = 8,
    progress: str | None = None,
    all_tokens: bool = False,
) -> dict[str, Moments]:
    """One forward pass per batch, hooks on every module; only assistant (label != -100) tokens
    count, or with `all_tokens` every real token (what an input-side guard must cover)."""
    moments = {name: Moments(torch.zeros(m.in_features, m.in_features, dtype=torch.float64)) for name, m in modules.items()}
    mask: torch.Tensor | None = None

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0][mask].double()
            moments[name].xtx += x.T @ x
            moments[name].tokens += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        examples = [tokenize_chat(tokenizer, c, max_length) for c in conversations]
        for i in tqdm(range(0, len(examples), batch_size), desc=progress, disable=progress is None, unit="batch"):
            batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            mask = batch["attention_mask"].bool() if all_tokens else batch["labels"] != IGNORE
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return moments


def output_second_moment(W: torch.Tensor, moments: Moments) -> torch.Tensor:
    """Y^T Y / n for Y = X W^T (d_out x d_out, float64)."""
    W64 = W.detach().double()
    return W64 @ moments.xtx @ W64.T / max(moments.tokens, 1)


def top_directions(M: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, float]:
    """Leading eigenvectors of a symmetric matrix (d x r, orthonormal), `rank` of them or as many as
    it takes to capture `energy` of its positive spectrum; returns them and the share captured."""
    eigvals, eigvecs = torch.linalg.eigh((M + M.T) / 2)
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    total = eigvals.sum().item()
    if energy is not None:
        cumulative = eigvals.cumsum(0) / total if total > 0 else torch.ones_like(eigvals)
        rank = int((cumulative < energy).sum().item()) + 1
    rank = min(rank or 1, M.shape[0])
    captured = eigvals[:rank].sum().item() / total if total > 0 else 0.0
    return eigvecs[:, :rank].to(torch.float32).contiguous(), captured


def module_bases(
    modules: dict[str, nn.Linear],
    moments: dict[str, Moments],
    rank: int | None,
    energy: float | None = None,
    contrast: dict[str, Moments] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per module: top-variance output directions (paper), or with `contrast` the directions whose
    energy on the safety data most exceeds that on contrast (benign) data: eigenvectors of
    E[y y^T | refusal] - E[y y^T | benign] with positive eigenvalues."""
    bases, captured = {}, {}
    for name, module in modules.items():
        M = output_second_moment(module.weight, moments[name])
        if contrast is not None:
            M = M - output_second_moment(module.weight, contrast[name])
        bases[name], captured[name] = top_directions(M, rank, energy)
    return bases, captured


def check_rank(modules: dict[str, nn.Linear], rank: int, what: str) -> None:
    if rank < 1:
        raise SaLoRAError(f"{what} must be at least 1")
    smallest = min(min(m.out_features, m.in_features) for m in modules.values())
    if rank > smallest:
        raise SaLoRAError(f"{what} {rank} exceeds the smallest target layer dimension ({smallest})")


def answers_by_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], max_new_tokens: int, progress: str
) -> list[Messages]:
    """The prompts (any given answer dropped) with the base model's own greedy answers."""
    prompts = [c[:-1] if c[-1]["role"] == "assistant" else c for c in conversations]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, progress=progress)
    return [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]


def refusals_by_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], judge: Judge, max_new_tokens: int
) -> tuple[list[Messages], int]:
    """The base model's own answers, keeping only those the judge calls refusals."""
    answered = answers_by_base(model, tokenizer, conversations, max_new_tokens, "base answers")
    return [c for c in answered if judge.is_refusal(prompt_text(c), c[-1]["content"])], len(answered)


def calibrate(
    model_spec: str,
    data: str | Path,
    out: str | Path,
    target_modules: list[str],
    rank_safety: int = 32,
    max_samples: int = 128,
    generate_responses: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    judge: Judge | None = None,
    energy: float | None = None,
    contrast_data: str | Path | None = None,
    input_energy: float | None = None,
) -> dict:
    """Compute and save the safety basis V_s for every target module (DESIGN.md section 1).

    `energy` picks r_s per module as the fewest directions capturing that share of the spectrum
    (instead of a fixed `rank_safety`). `contrast_data` (benign conversations; with
    `generate_responses`, benign prompts the model answers itself) makes the basis contrastive.
    `input_energy` also computes the input-side basis U (this project's guard, not the paper's):
    input directions holding that share of the safety conversations' energy over all their tokens
    (contrastive too when `contrast_data` is given).
    """
    out = Path(out)
    check_output_dir(out)
    for flag, value in (("--energy", energy), ("--input-energy", input_energy)):
        if value is not None and not 0 < value <= 1:
            raise SaLoRAError(f"{flag} must be in (0, 1]")
    conversations = read_chat_jsonl(data, need_assistant=not generate_responses)[:max_samples]
    contrast = read_chat_jsonl(contrast_data, need_assistant=not generate_responses)[:max_samples] if contrast_data else None
    model, tokenizer = load_model(model_spec)
    modules = linear_modules(model, target_modules)
    check_rank(modules, rank_safety, "--rank-safety")
    judge = judge or KeywordJudge()
    generated = None
    if generate_responses:
        conversations, asked = refusals_by_base(model, tokenizer, conversations, judge, max_new_tokens)
        generated = {"prompts": asked, "refusals_kept": len(conversations)}
        if not conversations:
            raise SaLoRAError(f"the base model refused none of the {asked} prompts; give refusals in the data instead")
        if contrast is not None:
            contrast = answers_by_base(model, tokenizer, contrast, max_new_tokens, "contrast answers")
    moments = record_input_moments(model, tokenizer, conversations, modules, batch_size=batch_size, progress="calibrate")
    tokens = next(iter(moments.values())).tokens
    if tokens == 0:
        raise SaLoRAError(f"{data}: no assistant tokens to calibrate on")
    contrast_moments = None
    if contrast is not None:
        contrast_moments = record_input_moments(model, tokenizer, contrast, modules, batch_size=batch_size, progress="contrast")
    bases, captured = module_bases(modules, moments, None if energy else rank_safety, energy, contrast_moments)
    tensors = {f"{name}.V": V for name, V in bases.items()}
    input_ranks = {}
    if input_energy is not None:
        inputs = record_input_moments(model, tokenizer, conversations, modules, batch_size=batch_size, all_tokens=True)
        contrast_inputs = (
            record_input_moments(model, tokenizer, contrast, modules, batch_size=batch_size, all_tokens=True) if contrast is not None else None
        )
        for name in modules:
            M = inputs[name].xtx / inputs[name].tokens
            if contrast_inputs is not None:
                M = M - contrast_inputs[name].xtx / contrast_inputs[name].tokens
            tensors[f"{name}.U"], _ = top_directions(M, energy=input_energy)
            input_ranks[name] = tensors[f"{name}.U"].shape[1]
    meta = {
        "base_model": model_id(model_spec),
        "base_weight_hash": weight_hash(modules),
        "module_hashes": {name: weight_hash({name: m}) for name, m in sorted(modules.items())},
        "target_modules": sorted(target_modules),
        "modules": sorted(modules),
        "basis": "contrastive" if contrast is not None else "variance",
        "rank_safety": rank_safety if energy is None else None,
        "energy": energy,
        "ranks": {name: V.shape[1] for name, V in sorted(bases.items())},
        "contrast_sequences": len(contrast) if contrast is not None else 0,
        "sequences": len(conversations),
        "response_tokens": tokens,
        "energy_captured": {name: round(e, 6) for name, e in sorted(captured.items())},
        "input_energy": input_energy,
        "input_ranks": dict(sorted(input_ranks.items())),
        "generated_responses": generated,
        "data": str(data),
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / SAFETY_TENSORS))
        write_json_atomic(tmp / SAFETY_META, meta)
    return meta


def load_safety(path: str | Path, modules: dict[str, nn.Linear]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Read a safety directory and check it was made for these exact modules of this exact base.
    Returns the output-side bases V and, when calibrated with an input energy, the input-side U."""
    path = Path(path)
    if not (path / SAFETY_TENSORS).is_file() or not (path / SAFETY_META).is_file():
        raise SaLoRAError(f"{path}: not a safety directory (needs {SAFETY_TENSORS} and {SAFETY_META})")
    try:
        meta = json.loads((path / SAFETY_META).read_text())
        tensors = load_file(str(path / SAFETY_TENSORS))
    except (ValueError, OSError) as e:
        raise SaLoRAError(f"{path}: unreadable safety files ({e})") from e
    hashes = meta.get("module_hashes", {})
    missing = sorted(name for name in modules if f"{name}.V" not in tensors or name not in hashes)
    if missing:
        raise SaLoRAError(
            f"{path}: no safety basis for {len(missing)} target modules (e.g. {missing[0]}); calibrate with the same --target-modules"
        )
    for name, module in modules.items():
        if hashes[name] != weight_hash({name: module}):
            raise SaLoRAError(f"{path}: made for another base model ({meta.get('base_model')}); calibrate on this model")
    inputs = {name: tensors[f"{name}.U"] for name in modules} if all(f"{name}.U" in tensors for name in modules) else None
    return {name: tensors[f"{name}.V"] for name in modules}, inputs
