"""Fixtures of the trainer tests: a safety basis (both guards) for q/v of the tiny Llama, and helpers
that read exported deltas back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from salora.calibrate import calibrate
from salora.export import PEFT_WEIGHTS

TARGETS = ["q_proj", "v_proj"]
# Tiny models on a shared 2-core machine: one thread each (also makes CPU runs bit-for-bit repeatable).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def qv_safety(tiny_model_dir, chat_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainer-safety") / "safety"
    calibrate(str(tiny_model_dir), chat_files["safety"], out, TARGETS, rank_safety=4, input_energy=0.9, device="cpu", dtype="float32")
    return out


def peft_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """dW = lora_B @ lora_A * (alpha / r) per module, from an exported adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter_dir / PEFT_WEIGHTS))
    names = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors if k.endswith("lora_A.weight")}
    return {n: scale * tensors[f"base_model.model.{n}.lora_B.weight"].double() @ tensors[f"base_model.model.{n}.lora_A.weight"].double()
            for n in names}


def delta_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all modules together."""
    assert set(a) == set(b) and a
    num = sum((a[n] - b[n]).norm() ** 2 for n in a) ** 0.5
    den = sum(b[n].norm() ** 2 for n in b) ** 0.5
    return (num / den).item()


@pytest.fixture(scope="session")
def other_base(tmp_path_factory, smollm_tokenizer) -> Path:
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("other-base"), smollm_tokenizer, seed=1)
