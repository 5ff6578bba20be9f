"""The hand-written safetensors reader and writer (gateway/adapters/tensors.py), against the library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gateway.adapters import tensors as st

DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def as_tensor(t: torch.Tensor) -> st.Tensor:
    return st.Tensor(DTYPES[t.dtype], tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())


def checked_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    with path.open("rb") as f:
        _, header = st.read_header(f, path.stat().st_size, 1 << 20)
    assert isinstance(header, dict)
    return {n: (e["dtype"], e["shape"]) for n, e in header.items() if n != "__metadata__"}


def test_a_written_file_is_byte_for_byte_the_librarys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {"b.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16),
               "c": torch.randn(3, 3).half(), "z": torch.randn(5).double(), "a.lora_A.weight": torch.randn(2, 7)}
    save_file(tensors, str(tmp_path / "library.safetensors"), metadata={"format": "pt"})
    st.write(tmp_path / "ours.safetensors", {n: as_tensor(t) for n, t in tensors.items()})
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    read = st.read(tmp_path / "library.safetensors", checked_header(tmp_path / "library.safetensors"))
    assert read == {n: as_tensor(t) for n, t in tensors.items()}  # metadata and layout do not matter to the reader
    for name, tensor in load_file(str(tmp_path / "ours.safetensors")).items():
        assert torch.equal(tensor, tensors[name])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_non_finite_values_are_found_in_every_dtype(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    ordinary = torch.tensor([0.0, -0.0, 1.5, info.max, -info.max, info.tiny, info.tiny / 4, info.eps], dtype=dtype)
    assert st.finite(as_tensor(ordinary))  # subnormals and the largest values are finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = ordinary.clone()
        values[3] = bad
        assert not st.finite(as_tensor(values)), (dtype, bad)


def test_shapes_come_from_headers_only(tmp_path: Path) -> None:
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(6, 4), "model.norm.weight": torch.zeros(4)},
              str(tmp_path / "model.safetensors"))
    assert st.shapes(tmp_path) == {"model.layers.0.self_attn.q_proj.weight": (6, 4), "model.norm.weight": (4,)}
    (tmp_path / "broken.safetensors").write_bytes((10**9).to_bytes(8, "little") + json.dumps({}).encode())
    with pytest.raises(ValueError, match="broken.safetensors: its header length"):
        st.shapes(tmp_path)
