"""--device/--dtype: a bfloat16 base with float32 adapter factors, optimizer state and projections;
bases and checkpoints checked across precisions; PEFT loads what a bfloat16 run exports."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from salora.calibrate import SAFETY_META, SAFETY_TENSORS, calibrate
from salora.export import export
from salora.models import linear_modules, load_model
from salora.train import SALORA_WEIGHTS, TRAINER_TENSORS, TrainOptions, train
from salora.tuner import SaLoRAConfig, load_salora
from salora_cli.main import main
from tests.trainer.conftest import TARGETS, peft_deltas


def logits(model, tokenizer, texts=("Hello there, how are you?", "What is 3 plus 4?")) -> torch.Tensor:
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bf16_calibrate_train_export_on_cpu_and_peft_loads_it(tiny_model_dir, chat_files, tmp_path):
    model = str(tiny_model_dir)
    assert main(["calibrate", "--model", model, "--data", str(chat_files["safety"]), "--out", str(tmp_path / "safety"),
                 "--target-modules", "q_proj,v_proj", "--rank-safety", "4", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    safety = json.loads((tmp_path / "safety" / SAFETY_META).read_text())
    assert safety["dtype"] == "bfloat16" and list(safety["weight_hashes"]) == ["bfloat16"]
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "safety" / SAFETY_TENSORS)).values())
    assert main(["train", "--model", model, "--data", str(chat_files["task"]), "--safety", str(tmp_path / "safety"),
                 "--out", str(tmp_path / "ckpt"), "--rank", "4", "--max-steps", "3", "--batch-size", "4", "--lr", "5e-3",
                 "--save-every", "2", "--dtype", "bf16"]) == 0
    ckpt = json.loads((tmp_path / "ckpt" / "salora_config.json").read_text())
    assert ckpt["dtype"] == "bfloat16" and ckpt["steps"] == 3
    weights = load_file(str(tmp_path / "ckpt" / SALORA_WEIGHTS))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())  # A, B, A0, B0, V, U in float32
    state = load_file(str(tmp_path / "ckpt" / "checkpoints" / "step-2" / TRAINER_TENSORS))
    moments = [t for k, t in state.items() if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments and all(t.dtype == torch.float32 for t in moments)  # AdamW state in float32
    assert all(t.dtype == torch.float32 for k, t in state.items() if k.startswith("param."))
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"), "--format", "merged",
                 "--dtype", "bfloat16"]) == 0

    # The trained model as it trained (bf16 base + float32 adapter) is the reference.
    trained, tokenizer = load_model(model, "cpu", torch.bfloat16)
    load_salora(trained, linear_modules(trained, TARGETS), weights, SaLoRAConfig(**ckpt["salora"]).scale)
    reference = logits(trained, tokenizer)
    base, _ = load_model(model, "cpu", torch.bfloat16)
    assert rel_err(logits(base, tokenizer), reference) > 1e-3  # training moved it
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert rel_err(logits(peft_model, tokenizer), reference) < 2e-2  # bf16 rounding of the sum only
    merged, _ = load_model(tmp_path / "merged", "cpu", None)
    assert next(merged.parameters()).dtype == torch.float32  # None on the CPU is float32 ...
    merged, _ = load_model(tmp_path / "merged", "cpu", "bfloat16")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"  # ... but the merged file is bf16
    assert rel_err(logits(merged, tokenizer), reference) < 2e-2
    # The same adapter on the float32 base: the factors are float32, so it applies there too.
    base32, _ = load_model(model)
    assert rel_err(logits(PeftModel.from_pretrained(base32, str(tmp_path / "adapter")).eval(), tokenizer), reference) < 2e-2
    # The update still lies in range(C) and off the safety inputs: exact in float32 factors.
    for name, delta in peft_deltas(tmp_path / "adapter").items():
        U = load_file(str(tmp_path / "safety" / SAFETY_TENSORS))[f"{name}.U"].double()
        assert delta.norm() > 0 and (delta @ U).norm() / delta.norm() < 1e-5


def test_salora_layer_in_bf16_computes_the_adapter_in_float32():
    from salora.tuner.layer import SaLoRALinear, zero_init

    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24, bias=False).to(torch.bfloat16)
    A0, B0 = zero_init(24, 32, 4)
    V, _ = torch.linalg.qr(torch.randn(24, 3))
    layer = SaLoRALinear(base, A0, B0, V, 2.0)
    with torch.no_grad():
        layer.B.copy_(torch.randn(24, 4))
    x = torch.randn(5, 32).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + 2.0 * (x.float() @ layer.A.T) @ (layer.B - V @ (V.T @ layer.B)).T
    assert rel_err(y.float(), expected) < 1e-2
    y.float().sum().backward()
    assert layer.A.grad.dtype == torch.float32 and layer.B.grad.dtype == torch.float32


def test_float32_basis_trains_a_bf16_base_and_the_other_way_round(tiny_model_dir, chat_files, qv_safety, tmp_path, other_base):
    common = dict(model=str(tiny_model_dir), data=str(chat_files["task"]), rank=4, max_steps=1, batch_size=4, device="cpu")
    train(TrainOptions(out=str(tmp_path / "a"), safety=str(qv_safety), dtype="bfloat16", **common))  # float32 basis, bf16 base
    calibrate(str(tiny_model_dir), chat_files["safety"], tmp_path / "bf16-safety", TARGETS, rank_safety=4, input_energy=0.9,
              device="cpu", dtype="bfloat16")
    train(TrainOptions(out=str(tmp_path / "b"), safety=str(tmp_path / "bf16-safety"), dtype="float32", **common))
    # A basis of another base is refused whatever the precisions.
    from salora.errors import SaLoRAError
    import pytest

    for dtype in ("bfloat16", "float32"):
        with pytest.raises(SaLoRAError, match="made for another base model"):
            train(TrainOptions(**{**common, "model": str(other_base)}, out=str(tmp_path / f"c-{dtype}"), safety=str(tmp_path / "bf16-safety"),
                               dtype=dtype))
        assert not (tmp_path / f"c-{dtype}").exists()
    # Exports check the base at the training precision: a merged export onto a float32 load of a bf16 run works.
    export(tmp_path / "a", tmp_path / "a-merged", "merged", device="cpu", dtype="float32")
    assert (tmp_path / "a-merged" / "config.json").is_file()
