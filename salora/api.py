"""SaLoRA from Python on any Hugging Face causal LM, the way PEFT users work:

    from salora.api import get_salora_model, save_peft_adapter
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = get_salora_model(model, safety="safety/")          # a basis from `salora calibrate`
    Trainer(model=model, args=..., train_dataset=..., data_collator=...).train()   # or TRL's SFTTrainer
    save_peft_adapter(model, "adapter/")                        # a standard PEFT LoRA for the unmodified base

Only the adapter's factors train (float32, whatever the base's dtype); everything else is frozen.
The saved adapter folds the projections in (rank r from the default zero start, 2r from the paper's
task-aware one), so `PeftModel.from_pretrained(base, "adapter/")` and vLLM serve it as is.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from salora.atomic import atomic_dir, write_json_atomic
from salora.calibrate import check_rank, load_safety, stream_bases
from salora.chat import Messages
from salora.errors import SaLoRAError
from salora.export import EXPORT_META, write_peft_adapter
from salora.models import linear_modules
from salora.tuner.config import SaLoRAConfig
from salora.tuner.model import inject_salora, salora_layers


def get_salora_model(
    model: nn.Module,
    safety: str | Path | None,
    config: SaLoRAConfig | None = None,
    task_conversations: list[Messages] | None = None,
    tokenizer=None,
    seed: int = 0,
) -> nn.Module:
    """Wrap `model`'s target linear layers in SaLoRA layers, in place, and return it. `safety` is a
    directory from `salora calibrate` made on this base (checked by weight hash); the default config
    is the input guard on the basis's modules. The paper's task-aware init (`init="task"`) also needs
    `task_conversations` and the `tokenizer`."""
    config = config or SaLoRAConfig()
    modules = linear_modules(model, config.target_modules)
    check_rank(modules, config.rank, "rank")
    bases, inputs = load_safety(safety, modules) if safety is not None else (None, None)
    if config.projection in ("output", "both") and bases is None:
        raise SaLoRAError(f"projection {config.projection!r} needs a safety directory")
    if config.projection in ("input", "both") and inputs is None:
        raise SaLoRAError(f"projection {config.projection!r} needs a safety basis calibrated with an input energy")
    task_bases = None
    if config.init in ("task", "task-scaled"):
        if task_conversations is None or tokenizer is None:
            raise SaLoRAError(f"init {config.init!r} needs task_conversations and the tokenizer")
        check_rank(modules, config.task_rank, "task_rank")
        task_bases = stream_bases(model, tokenizer, task_conversations, modules, config.task_rank, progress=None).V
    inject_salora(model, modules, config, bases, task_bases, seed=seed, input_bases=inputs)
    model.salora_config = config
    return model


def save_peft_adapter(model: nn.Module, out: str | Path, base_model_name_or_path: str | None = None) -> dict:
    """Write the trained SaLoRA layers of `model` as a standard PEFT LoRA adapter (atomically)."""
    layers = salora_layers(model)
    if not layers:
        raise SaLoRAError("the model has no SaLoRA layers (wrap it with get_salora_model first)")
    config: SaLoRAConfig = getattr(model, "salora_config", None) or SaLoRAConfig()
    base_id = base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None)
    with atomic_dir(out) as tmp:
        rank = write_peft_adapter({name: layer.lora_factors() for name, layer in layers.items()}, config.target_modules, base_id, tmp)
        record = {"format": "peft", "method": "salora", "base_model_id": base_id, "target_modules": config.target_modules,
                  "train_rank": config.rank, "rank": rank, "salora": config.to_dict()}
        write_json_atomic(tmp / EXPORT_META, record)
    return record
