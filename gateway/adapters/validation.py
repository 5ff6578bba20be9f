"""Checking an unpacked upload against the served base before anything loads it.

An adapter is accepted only as a plain PEFT LoRA in safetensors (a pickle file is never opened),
with a config that parses into the canonical allow-list (gateway/adapters/canonical.py), tensors
whose names and shapes fit the base's decoder-layer linear layers at the config's rank, and finite
weights. What is stored and served is a config and a weights file the gateway wrote itself. A `salora train`
checkpoint is first exported to that form (`salora.export.export`, which needs the `local` extra). The
safetensors files are parsed, checked and written by hand (gateway/adapters/tensors.py): no torch."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from gateway.adapters import tensors as st
from gateway.adapters.canonical import AdapterConfig, refused
from gateway.adapters.errors import AdapterRejected
from salora.errors import SaLoRAError
from salora.files import CHECKPOINT_CONFIG, PEFT_CONFIG, PEFT_WEIGHTS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
DTYPE_BYTES = st.DTYPE_BYTES
DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")
TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass(frozen=True)
class BaseModelInfo:
    """What validation and the canary need to know about the served base."""

    model_id: str
    identity: str  # SHA-256 of the weight files: the canary caches base answers under it
    linear: dict[str, tuple[int, int]] = field(repr=False)  # module path -> (out features, in features)

    @property
    def key(self) -> str:
        return f"{self.model_id}@{self.identity[:16]}"


def inspect_base(model_id: str, model_dir: Path) -> BaseModelInfo:
    """Read the base's weight names and shapes from its safetensors headers (no tensor is loaded) and
    hash its weight files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SaLoRAError(f"{model_dir}: no safetensors weights to check adapters against")
    try:
        shapes = st.shapes(model_dir)
    except (ValueError, KeyError, TypeError) as e:
        raise SaLoRAError(f"{model_dir}: unreadable safetensors header ({e})") from e
    linear = {name.removesuffix(".weight"): (shape[0], shape[1])
              for name, shape in shapes.items() if name.endswith(".weight") and len(shape) == 2}
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return BaseModelInfo(model_id, digest.hexdigest(), linear)


@dataclass(frozen=True)
class AdapterInfo:
    sha256: str  # content hash of the two stored files
    source: str  # `peft` or `checkpoint` (exported on arrival)
    rank: int
    target_modules: list[str]
    modules: int  # layers the adapter changes
    size_bytes: int


def _reject(message: str, code: str = "invalid_adapter") -> AdapterRejected:
    return AdapterRejected(message, code=code)


def _pickles(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)


def _export_checkpoint(root: Path, out: Path) -> Path:
    try:
        from salora.export import export  # torch and peft: the `local` extra
    except ImportError as e:
        raise _reject(f"a `salora train` checkpoint is exported on arrival, which needs the in-process extra "
                      f"(pip install 'salora-gateway[local]'; missing {e.name}); upload the adapter that "
                      "`salora export` writes instead", code="bad_checkpoint") from e
    try:
        export(root, out, "peft")  # reads safetensors and JSON only
    except (SaLoRAError, KeyError, TypeError, ValueError, OSError) as e:
        raise _reject(f"the `salora train` checkpoint cannot be exported: {e}", code="bad_checkpoint") from e
    return out


def _read_config(path: Path, max_rank: int) -> AdapterConfig:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _reject(f"{PEFT_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise _reject(f"{PEFT_CONFIG} is not valid JSON ({e})") from e
    return AdapterConfig.parse(config, max_rank)


def _read_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape), after checking that the header is bounded, well-formed, and that
    its tensors tile the data section exactly."""
    size = path.stat().st_size
    with path.open("rb") as f:
        try:
            length, header = st.read_header(f, size, MAX_HEADER_BYTES)
        except ValueError as e:
            raise _reject(f"{PEFT_WEIGHTS}: {e}", code="bad_weights") from e
    if not isinstance(header, dict):
        raise _reject(f"{PEFT_WEIGHTS}: the safetensors header is not an object", code="bad_weights")
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int)
                  and end - begin == math.prod(shape) * DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _reject(f"{PEFT_WEIGHTS}: tensor {name!r} has a bad header entry (dtype must be one of "
                          f"{', '.join(DTYPE_BYTES)})", code="bad_weights")
        tensors[name] = (dtype, list(shape))
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _reject(f"{PEFT_WEIGHTS}: tensor data overlaps or leaves gaps", code="bad_weights")
        position = end
    if 8 + length + position != size:
        raise _reject(f"{PEFT_WEIGHTS}: the file is {size} bytes, its header describes {8 + length + position}",
                      code="bad_weights")
    return tensors


def _targets_match(module: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list: each entry names the last part(s) of module paths."""
    return any(module == t or module.endswith("." + t) for t in targets)


def _servable(module: str) -> bool:
    """A linear layer inside a decoder layer: the embeddings and the output head are shared by every
    tenant and never adapted."""
    return DECODER_LAYER.search(module) is not None


def _check_tensors(tensors: dict[str, tuple[str, list[int]]], config: AdapterConfig, base: BaseModelInfo) -> int:
    """Every tensor is a lora_A/lora_B pair of a base decoder-layer linear layer the config targets,
    with fitting shapes and the config's rank; returns the number of layers."""
    if not tensors:
        raise _reject(f"{PEFT_WEIGHTS} holds no tensors", code="bad_weights")
    modules: dict[str, dict[str, list[int]]] = {}
    for name, (_, shape) in tensors.items():
        m = TENSOR_NAME.match(name)
        if m is None:
            raise _reject(f"unexpected tensor {name!r}: only lora_A and lora_B weights of a plain LoRA are served",
                          code="unsupported_adapter")
        modules.setdefault(m["module"], {})[m["factor"]] = shape
    servable = [module for module in base.linear if _servable(module)]
    for target in config.target_modules:
        if not any(_targets_match(module, (target,)) for module in servable):
            raise refused("target_modules", f"{target!r} is not a linear layer of the decoder layers of the base "
                          f"{base.model_id}", code="wrong_base")
    for module, factors in sorted(modules.items()):
        if set(factors) != {"A", "B"}:
            raise _reject(f"layer {module}: lora_A and lora_B must come together", code="bad_weights")
        if module not in base.linear:
            raise _reject(f"layer {module} does not exist in the base {base.model_id}: the adapter was made for "
                          "another model", code="wrong_base")
        if not _servable(module):
            raise _reject(f"layer {module} is shared by every tenant and is never adapted; only the linear layers "
                          "of the decoder layers are", code="unsupported_adapter")
        if not _targets_match(module, config.target_modules):
            raise _reject(f"layer {module} has weights but is not among target_modules {list(config.target_modules)}",
                          code="bad_weights")
        out_features, in_features = base.linear[module]
        a, b = factors["A"], factors["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != in_features or b[0] != out_features or a[0] != b[1]:
            raise _reject(f"layer {module}: lora_A {a} and lora_B {b} do not fit the base layer "
                          f"({out_features} x {in_features}) of {base.model_id}: the adapter was made for another "
                          "model", code="wrong_base")
        if a[0] != config.r:
            raise _reject(f"layer {module}: rank {a[0]} differs from r = {config.r} in {PEFT_CONFIG}",
                          code="bad_weights")
    return len(modules)


def _canonical_weights(source: Path, header: dict[str, tuple[str, list[int]]], target: Path) -> None:
    """Check every tensor is finite, then write them afresh (no metadata, no other tensor): the engines
    load only files the gateway wrote."""
    tensors = st.read(source, header)
    for name, tensor in tensors.items():
        if not st.finite(tensor):
            raise _reject(f"tensor {name} holds NaN or infinite values", code="non_finite_weights")
    st.write(target, tensors)


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def validate(root: Path, work: Path, base: BaseModelInfo, max_rank: int) -> tuple[AdapterInfo, Path]:
    """Check the adapter (or checkpoint) in `root`; returns its description and a new directory under
    the scratch directory `work` holding just the two files to serve. Raises AdapterRejected with the
    first problem found."""
    source = "peft"
    if (root / CHECKPOINT_CONFIG).is_file():
        root, source = _export_checkpoint(root, work / "exported"), "checkpoint"
    config_path, weights_path = root / PEFT_CONFIG, root / PEFT_WEIGHTS
    if not weights_path.is_file():
        pickles = _pickles(root)
        if pickles:
            raise _reject(f"{', '.join(pickles)}: pickle files are never loaded; save the adapter with safetensors "
                          f"({PEFT_WEIGHTS})", code="pickle_not_allowed")
        raise _reject(f"no {PEFT_WEIGHTS} in the upload", code="missing_file")
    if not config_path.is_file():
        raise _reject(f"no {PEFT_CONFIG} in the upload", code="missing_file")
    config = _read_config(config_path, max_rank)
    tensors = _read_header(weights_path)
    modules = _check_tensors(tensors, config, base)
    out = work / "adapter"
    out.mkdir()
    files = [out / PEFT_CONFIG, out / PEFT_WEIGHTS]
    _canonical_weights(weights_path, tensors, files[1])
    files[0].write_text(json.dumps(config.to_json(base.model_id), indent=2) + "\n")
    return AdapterInfo(
        sha256=_sha256(files), source=source, rank=config.r, target_modules=list(config.target_modules),
        modules=modules, size_bytes=sum(p.stat().st_size for p in files),
    ), out
