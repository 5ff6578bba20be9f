"""`salora align` on a tiny model: the shipped-delta recipe runs end to end and its adapter loads."""

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from salora.align import align
from salora.models import load_model


def test_align_writes_float16_adapter_that_peft_loads(tiny_model_dir, tmp_path):
    record = align(tmp_path / "alignment", rank=2, alpha=4, epochs=1, batch_size=32, base=str(tiny_model_dir), arithmetic_questions=4, max_new_tokens=4)
    files = sorted(p.name for p in (tmp_path / "alignment").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "alignment.json"]
    assert record["data"]["refusals"] >= 150 and record["steps"] >= 1
    assert json.loads((tmp_path / "alignment" / "alignment.json").read_text())["recipe"]["target_modules"][-1] == "down_proj"
    weights = load_file(str(tmp_path / "alignment" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float16 for w in weights.values())
    assert any(k.endswith("down_proj.lora_B.weight") and w.abs().max() > 0 for k, w in weights.items())
    model, _ = load_model(tiny_model_dir)
    PeftModel.from_pretrained(model, str(tmp_path / "alignment"))
