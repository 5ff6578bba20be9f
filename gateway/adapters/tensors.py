"""safetensors files read and written by hand, with numpy only: the vLLM-mode gateway validates
uploads, reads the base's shapes and writes its probe adapter without torch.

The layout written is the safetensors library's own (tensors sorted by dtype, widest first, then by
name; a compact JSON header padded with spaces to 8 bytes), so a file written here is byte for byte
what `safetensors.torch.save_file` writes for the same tensors (tests/gateway/test_tensors.py)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# dtype -> (bytes per element, the little-endian unsigned integer of that width, the mask of its
# exponent bits): an IEEE float is NaN or infinite exactly when all its exponent bits are set.
FLOATS: dict[str, tuple[int, str, int]] = {
    "F16": (2, "<u2", 0x7C00),
    "BF16": (2, "<u2", 0x7F80),
    "F32": (4, "<u4", 0x7F800000),
    "F64": (8, "<u8", 0x7FF0000000000000),
}
DTYPE_BYTES = {name: width for name, (width, _, _) in FLOATS.items()}
_ORDER = {"F16": 0, "BF16": 1, "F32": 2, "F64": 3}  # the library's dtype order, for its sort


@dataclass(frozen=True, slots=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def read_header(f: BinaryIO, size: int, limit: int) -> tuple[int, object]:
    """The header's length and its parsed JSON (unchecked); ValueError when it cannot be one."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError("not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", prefix)
    if length > limit or 8 + length > size:
        raise ValueError(f"its header length {length} is impossible for a {size}-byte file")
    try:
        return length, json.loads(f.read(length))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"the safetensors header is not JSON ({e})") from e


def shapes(model_dir: Path, limit: int = 100 << 20) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the model directory's safetensors files, from their headers only."""
    found: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            try:
                _, header = read_header(f, path.stat().st_size, limit)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the safetensors header is not an object")
        for name, entry in header.items():
            if name != "__metadata__":
                found[name] = tuple(entry["shape"])
    return found


def read(path: Path, header: dict[str, tuple[str, list[int]]]) -> dict[str, Tensor]:
    """The tensors of a file whose header has been checked (`header`: name -> dtype, shape)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = json.loads(f.read(length))
        data = f.read()
    return {name: Tensor(dtype, tuple(shape), data[slice(*raw[name]["data_offsets"])])
            for name, (dtype, shape) in header.items()}


def finite(tensor: Tensor) -> bool:
    """No NaN and no infinity among the tensor's values."""
    import numpy as np  # a fifth of a second: imported on the first upload, not at start

    _, unsigned, mask = FLOATS[tensor.dtype]
    bits = np.frombuffer(tensor.data, dtype=unsigned)
    exponent = np.array(mask, dtype=unsigned)
    return not bool(np.any((bits & exponent) == exponent))


def write(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file of `tensors` and nothing else (no metadata), laid out as the library does."""
    order = sorted(tensors, key=lambda name: (-_ORDER[tensors[name].dtype], name))
    header: dict[str, object] = {}
    position = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [position, position + len(t.data)]}
        position += len(t.data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(tensors[name].data)
