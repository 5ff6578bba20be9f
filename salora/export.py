"""Export a `salora train` checkpoint as a standard PEFT adapter for the UNMODIFIED base (rank 2r
from the task-aware init, r from the zero one, projections folded in; served by PEFT and by vLLM's
stock multi-LoRA) or as a merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from salora.atomic import atomic_dir, check_output_dir, write_json_atomic
from salora.errors import SaLoRAError
from salora.files import CHECKPOINT_CONFIG, PEFT_CONFIG, PEFT_WEIGHTS, SALORA_WEIGHTS
from salora.models import linear_modules, load_model, weight_hash
from salora.precision import resolve_device, resolve_dtype, same_weights, weight_hashes
from salora.tuner.config import SaLoRAConfig
from salora.tuner.layer import lora_factors
from salora.tuner.model import split_state

EXPORT_META = "salora_export.json"
FORMATS = ("peft", "merged")


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CHECKPOINT_CONFIG).is_file():
        raise SaLoRAError(f"{path}: not a `salora train` checkpoint (no {CHECKPOINT_CONFIG})")
    meta = json.loads((path / CHECKPOINT_CONFIG).read_text())
    weights = SALORA_WEIGHTS if meta.get("method") == "salora" else PEFT_WEIGHTS
    if not (path / weights).is_file():
        raise SaLoRAError(f"{path}: checkpoint has no {weights}")
    return meta


def salora_lora_factors(path: str | Path, meta: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module path, the exact (lora_A, lora_B) of a SaLoRA checkpoint."""
    scale = SaLoRAConfig(**meta["salora"]).scale
    groups = split_state(load_file(str(Path(path) / SALORA_WEIGHTS)))
    return {name: lora_factors(g["A"], g["B"], g["A0"], g["B0"], g["V"], scale, g.get("U")) for name, g in groups.items()}


def _export_peft(checkpoint: Path, meta: dict, out: Path) -> dict:
    if meta["method"] == "lora":
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):
            shutil.copyfile(checkpoint / name, out / name)
        return {"rank": json.loads((out / PEFT_CONFIG).read_text())["r"]}
    return {"rank": write_peft_adapter(salora_lora_factors(checkpoint, meta), meta["salora"]["target_modules"], meta["base_model_id"], out)}


def write_peft_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], target_modules: list[str], base_id: str | None, out: Path) -> int:
    """A standard PEFT LoRA directory from exact (lora_A, lora_B) per module path; returns its rank."""
    rank = next(iter(factors.values()))[0].shape[0]
    tensors = {}
    for name, (lora_A, lora_B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.detach().float().cpu().contiguous()
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    # lora_alpha == r makes PEFT's own scale 1: the factors already carry s.
    LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_id,
    ).save_pretrained(out)
    return rank


def _export_merged(checkpoint: Path, meta: dict, out: Path, model_spec: str | None, device, dtype) -> dict:
    """The base in `dtype` on `device` plus the exact delta, added in float32 and rounded once."""
    model, tokenizer = load_model(model_spec or meta["base_model"], device, dtype)
    modules = linear_modules(model, meta["salora"]["target_modules"])
    if "weight_hashes" in meta:
        same = same_weights(meta["weight_hashes"], weight_hashes(modules))
    else:
        same = weight_hash(modules) == meta["base_weight_hash"]
    if not same:
        raise SaLoRAError(f"base model {model_spec or meta['base_model']} is not the one this checkpoint was trained on"
                          + (" (or not at a precision it can be checked at: use the training --dtype)" if same is None else ""))
    if meta["method"] == "lora":
        model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    else:
        with torch.no_grad():
            for name, (lora_A, lora_B) in salora_lora_factors(checkpoint, meta).items():
                W = modules[name].weight
                W.copy_((W.float() + (lora_B @ lora_A).to(W.device)).to(W.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def export(
    checkpoint: str | Path, out: str | Path, fmt: str = "peft", model_spec: str | None = None,
    device: str | None = None, dtype: str | None = None,
) -> dict:
    """Write the export atomically; returns its provenance record (also saved as salora_export.json).
    `device`/`dtype` (merged only; default CUDA with bfloat16 when present, else the CPU in float32)
    choose where the base is loaded and the precision of the merged weights."""
    from salora.distributed import refuse_distributed

    if fmt not in FORMATS:
        raise SaLoRAError(f"--format must be one of {', '.join(FORMATS)}")
    refuse_distributed("export")
    if fmt == "merged":
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
    elif device is not None or dtype is not None:
        raise SaLoRAError(f"{'--dtype' if dtype is not None else '--device'} applies to --format merged only (a PEFT export loads no model)")
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_dir(out)
    meta = read_checkpoint(checkpoint)
    with atomic_dir(out) as tmp:
        info = _export_peft(checkpoint, meta, tmp) if fmt == "peft" else _export_merged(checkpoint, meta, tmp, model_spec, device, dtype)
        record = {
            "format": fmt,
            "method": meta["method"],
            "base_model_id": meta["base_model_id"],
            "base_weight_hash": meta["base_weight_hash"],
            "target_modules": meta["salora"]["target_modules"],
            "train_rank": meta["salora"]["rank"],
            **info,
        }
        write_json_atomic(tmp / EXPORT_META, record)
    return record
