"""Injecting SaLoRA layers into a model, and saving/loading their state as a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from salora.tuner.config import SaLoRAConfig
from salora.tuner.layer import SaLoRALinear, project_out, project_rows, task_aware_init, zero_init

TENSORS = ("A", "B", "A0", "B0", "V", "U")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _wrap(
    model: nn.Module, name: str, linear: nn.Linear, A0: torch.Tensor, B0: torch.Tensor,
    V: torch.Tensor | None, scale: float, U: torch.Tensor | None,
) -> SaLoRALinear:
    """Turn the base weight into the residual W_res = W - s C B0 A0 P and wrap it, so the wrapped
    model computes exactly the base at A = A0, B = B0. The factors and bases live in float32 on the
    weight's device whatever the base's dtype; the residual is formed in float32 and rounded once."""
    device = linear.weight.device
    A0, B0 = A0.to(device, torch.float32), B0.to(device, torch.float32)
    V = V.to(device, torch.float32) if V is not None else None
    U = U.to(device, torch.float32) if U is not None else None
    if torch.any(B0):  # a zero start leaves W_res = W bit for bit
        linear.weight.copy_((linear.weight.float() - scale * project_out(V, B0) @ project_rows(U, A0)).to(linear.weight.dtype))
    layer = SaLoRALinear(linear, A0, B0, V, scale, U)
    _set_module(model, name, layer)
    return layer


@torch.no_grad()
def inject_salora(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    config: SaLoRAConfig,
    safety_bases: dict[str, torch.Tensor] | None,
    task_bases: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    input_bases: dict[str, torch.Tensor] | None = None,
) -> dict[str, SaLoRALinear]:
    """Replace each target nn.Linear by a SaLoRALinear and freeze everything else. `config.projection`
    picks which of the output-side (`safety_bases`, V) and input-side (`input_bases`, U) guards apply."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in sorted(modules):
        W = modules[name].weight
        V = safety_bases[name] if config.projection in ("output", "both") else None
        U = input_bases[name] if config.projection in ("input", "both") else None
        if config.init in ("task", "task-scaled"):
            if task_bases is None:
                raise ValueError("task-aware init needs task bases")
            A0, B0 = task_aware_init(W, task_bases[name].to(W.device), config.rank, scaled=config.init == "task-scaled")
        else:
            A0, B0 = zero_init(W.shape[0], W.shape[1], config.rank, generator)
        layers[name] = _wrap(model, name, modules[name], A0, B0, V, config.scale, U)
    return layers


@torch.no_grad()
def load_salora(model: nn.Module, modules: dict[str, nn.Linear], state: dict[str, torch.Tensor], scale: float) -> dict[str, SaLoRALinear]:
    """Rebuild a trained SaLoRA model (the training-time form) from a checkpoint's tensors."""
    layers = {}
    for name, t in split_state(state).items():
        bases = [t[k] if k in t and t[k].shape[1] else None for k in ("V", "U")]
        layers[name] = _wrap(model, name, modules[name], t["A0"], t["B0"], bases[0], scale, bases[1])
        layers[name].A.copy_(t["A"])
        layers[name].B.copy_(t["B"])
    return layers


def salora_layers(model: nn.Module) -> dict[str, SaLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SaLoRALinear)}


def salora_state(layers: dict[str, SaLoRALinear]) -> dict[str, torch.Tensor]:
    """Flat tensors `<module path>.{A,B,A0,B0,V}` for a safetensors checkpoint."""
    return {f"{name}.{t}": getattr(layer, t).detach().cpu().contiguous().clone() for name, layer in layers.items() for t in TENSORS}


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a checkpoint's flat tensors by module path."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.rpartition(".")
        grouped.setdefault(module, {})[part] = tensor
    return grouped
