"""Where and in which precision a model runs (`--device`, `--dtype`), and fingerprints of its
weights that hold across precisions.

The base model runs in the chosen dtype; adapter parameters, their optimizer state and the safety
projections stay in float32 (as PEFT keeps its LoRA weights), and the adapter's input is cast to
float32 before the low-rank product, its output back to the base's dtype after it.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from salora.errors import SaLoRAError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device(device: str | None) -> torch.device:
    """`--device`: None or `auto` is CUDA when present (the local rank's under torchrun), else the CPU."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SaLoRAError(f"--device {device}: not a device (cpu, cuda, cuda:N or auto)") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SaLoRAError(f"--device {device}: no CUDA device on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise SaLoRAError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if resolved.type not in ("cpu", "cuda"):
        raise SaLoRAError(f"--device {device}: only cpu and cuda are supported")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`--dtype`: None or `auto` is bfloat16 on CUDA and float32 on the CPU (bfloat16 on the CPU is allowed)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SaLoRAError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise SaLoRAError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)} (or auto)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")




# Precisions a hash can be taken at, finest first. A model loaded in one of them can be hashed at it
# and at every coarser one (rounding float32 to bfloat16 is what loading with dtype=bfloat16 does).
HASH_PRECISIONS = {torch.float32: ("float32", "bfloat16", "float16"), torch.bfloat16: ("bfloat16",), torch.float16: ("float16",)}


def _weight_bytes(weight: torch.Tensor, dtype: torch.dtype) -> bytes:
    w = weight.detach().to(dtype).contiguous().cpu()
    return (w if dtype == torch.float32 else w.view(torch.int16)).numpy().tobytes()


def weight_hashes(modules: dict[str, nn.Linear]) -> dict[str, dict]:
    """Per precision the model's weights can be compared at: `{"all": hash, "modules": {name: hash}}`.
    `all` at float32 equals `weight_hash`. A basis made on a float32 base checks against the same
    base loaded in bfloat16 by the bfloat16 entry, and the other way round."""
    dtype = next(iter(modules.values())).weight.dtype
    out = {}
    for precision in HASH_PRECISIONS.get(dtype, ()):
        target = getattr(torch, precision)
        overall, per_module = hashlib.sha256(), {}
        for name in sorted(modules):
            data = _weight_bytes(modules[name].weight, target)
            overall.update(name.encode())
            overall.update(data)
            one = hashlib.sha256(name.encode())
            one.update(data)
            per_module[name] = one.hexdigest()
        out[precision] = {"all": overall.hexdigest(), "modules": per_module}
    return out


def same_weights(recorded: dict[str, dict], current: dict[str, dict], names: list[str] | None = None) -> bool | None:
    """Whether two `weight_hashes` records agree at every precision they share (only the modules in
    `names`, when given); None when they share no precision (float16 against bfloat16)."""
    shared = [p for p in recorded if p in current]
    if not shared:
        return None
    for p in shared:
        if names is None:
            if recorded[p]["all"] != current[p]["all"]:
                return False
        elif any(recorded[p]["modules"].get(n) != current[p]["modules"].get(n) for n in names):
            return False
    return True
