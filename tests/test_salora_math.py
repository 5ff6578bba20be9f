"""The SaLoRA math on tiny random Llama models: step-0 identity, orthogonality of the update to the
safety basis, exactness of the PEFT and merged exports, and gradients of the low-rank projection.
Most of it is the paper's configuration (task-aware init, output projection C), asked for explicitly:
the defaults are the input guard with a standard LoRA start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from salora.calibrate import SAFETY_TENSORS, calibrate, module_bases, record_input_moments
from salora.chat import read_chat_jsonl
from salora.export import PEFT_WEIGHTS, export
from salora.models import linear_modules, load_model
from salora.train import SALORA_WEIGHTS, TrainOptions, train
from salora.tuner import SaLoRAConfig, SaLoRALinear, inject_salora, load_salora
from salora.tuner.model import split_state

TARGETS = ["q_proj", "v_proj"]
PAPER = {"init": "task", "projection": "output"}


def logits(model, tokenizer, texts=("Hello there, how are you?", "Tell me a story about a cat.")) -> torch.Tensor:
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def peft_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """dW = lora_B @ lora_A * (alpha / r) per module, read back from an exported adapter."""
    import json

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter_dir / PEFT_WEIGHTS))
    names = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors if k.endswith("lora_A.weight")}
    return {
        n: scale * tensors[f"base_model.model.{n}.lora_B.weight"] @ tensors[f"base_model.model.{n}.lora_A.weight"] for n in names
    }


@pytest.fixture(scope="module")
def safety_dir(tiny_model_dir, chat_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "safety"
    calibrate(str(tiny_model_dir), chat_files["safety"], out, TARGETS, rank_safety=8)
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir, chat_files, safety_dir, tmp_path_factory) -> dict[str, Path]:
    """A SaLoRA and a LoRA checkpoint trained with the same data, rank, steps, lr and seed, exported."""
    root = tmp_path_factory.mktemp("trained")
    paths = {}
    for method in ("salora", "lora"):
        ckpt = root / f"{method}-ckpt"
        train(TrainOptions(model=str(tiny_model_dir), data=str(chat_files["task"]), out=str(ckpt), safety=str(safety_dir),
                           method=method, rank=4, lr=5e-3, max_steps=6, batch_size=4, task_rank=8, **PAPER))
        paths[method] = ckpt
        export(ckpt, root / f"{method}-peft", "peft")
        paths[f"{method}-peft"] = root / f"{method}-peft"
    export(paths["salora"], root / "salora-merged", "merged")
    paths["salora-merged"] = root / "salora-merged"
    return paths


def test_step_zero_equals_base(tiny_model_dir, chat_files):
    base, tokenizer = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    modules = linear_modules(model, TARGETS)
    safety, _ = module_bases(modules, record_input_moments(model, tokenizer, read_chat_jsonl(chat_files["safety"]), modules), 8)
    task, _ = module_bases(modules, record_input_moments(model, tokenizer, read_chat_jsonl(chat_files["task"]), modules), 8)
    weights = {name: m.weight.clone() for name, m in modules.items()}
    inject_salora(model, modules, SaLoRAConfig(rank=4, target_modules=TARGETS, **PAPER), safety, task)
    expected = logits(base, tokenizer)
    assert (logits(model, tokenizer) - expected).abs().max().item() < 1e-5
    # Control: without the residual the task-aware start is far from the base, so the check above can fail.
    for name, layer in model.named_modules():
        if isinstance(layer, SaLoRALinear):
            layer.base.weight.copy_(weights[name])
    assert (logits(model, tokenizer) - expected).abs().max().item() > 1e-3


def test_untrained_checkpoint_exports_zero_delta(tiny_model_dir, chat_files, safety_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(TrainOptions(model=str(tiny_model_dir), data=str(chat_files["task"]), out=str(ckpt), safety=str(safety_dir), rank=4, max_steps=0,
                       task_rank=8, **PAPER))
    export(ckpt, tmp_path / "peft", "peft")
    deltas = peft_deltas(tmp_path / "peft")
    assert len(deltas) == 4  # q and v of 2 layers
    state = split_state(load_file(str(ckpt / SALORA_WEIGHTS)))
    for name, delta in deltas.items():
        init_size = (state[name]["B0"] @ state[name]["A0"]).norm()
        assert init_size > 1e-3  # task-aware start is non-trivial
        assert delta.abs().max().item() < 1e-6 * max(1.0, init_size.item())


def test_update_is_orthogonal_to_safety_basis(trained, safety_dir):
    bases = {k.removesuffix(".V"): v for k, v in load_file(str(safety_dir / SAFETY_TENSORS)).items()}
    salora, lora = peft_deltas(trained["salora-peft"]), peft_deltas(trained["lora-peft"])
    assert set(salora) == set(lora) == set(bases)
    for name, V in bases.items():
        assert salora[name].norm() > 0
        assert (V.T @ salora[name]).norm() / salora[name].norm() < 1e-4
        assert (V.T @ lora[name]).norm() / lora[name].norm() > 1e-2


def test_exports_reproduce_trained_model(trained, tiny_model_dir):
    import json

    meta = json.loads((trained["salora"] / "salora_config.json").read_text())
    model, tokenizer = load_model(tiny_model_dir)
    load_salora(model, linear_modules(model, TARGETS), load_file(str(trained["salora"] / SALORA_WEIGHTS)), SaLoRAConfig(**meta["salora"]).scale)
    reference = logits(model, tokenizer)
    base, _ = load_model(tiny_model_dir)
    assert rel_err(logits(base, tokenizer), reference) > 1e-3  # training moved the model
    peft_model = PeftModel.from_pretrained(base, str(trained["salora-peft"])).eval()
    assert rel_err(logits(peft_model, tokenizer), reference) < 1e-4
    merged, _ = load_model(trained["salora-merged"])
    assert rel_err(logits(merged, tokenizer), reference) < 1e-4


def test_lowrank_projection_gradients_match_dense_reference():
    torch.manual_seed(0)
    d_in, d_out, r, r_s, s = 16, 12, 3, 4, 2.0
    V, _ = torch.linalg.qr(torch.randn(d_out, r_s, dtype=torch.float64))
    A0, B0 = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    base = torch.nn.Linear(d_in, d_out, bias=False).double()
    layer = SaLoRALinear(base, A0, B0, V, s)
    x, g = torch.randn(5, 7, d_in, dtype=torch.float64), torch.randn(5, 7, d_out, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    C = torch.eye(d_out, dtype=torch.float64) - V @ V.T
    dense = base(x) + s * ((x @ A.T) @ B.T) @ C.T  # the reference code's per-token d_out x d_out product
    (dense * g).sum().backward()
    assert torch.allclose(layer.A.grad, A.grad, atol=1e-10)
    assert torch.allclose(layer.B.grad, B.grad, atol=1e-10)
    assert layer.B.grad.norm() > 0


def test_contrastive_basis_separates_refusal_from_benign_and_energy_picks_rank():
    from salora.calibrate import Moments

    d = 6
    linear = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(d))
    e = torch.eye(d, dtype=torch.float64)
    # Refusal activations: a large direction shared with benign text (e0) plus a refusal-only one (e1).
    harmful = Moments(100 * torch.outer(e[0], e[0]) * 10 + 100 * torch.outer(e[1], e[1]), tokens=100)
    benign = Moments(100 * torch.outer(e[0], e[0]) * 10 + 100 * torch.outer(e[2], e[2]) * 0.5, tokens=100)
    variance, _ = module_bases({"m": linear}, {"m": harmful}, rank=1)
    contrastive, _ = module_bases({"m": linear}, {"m": harmful}, rank=1, contrast={"m": benign})
    assert abs(variance["m"][0, 0]) == pytest.approx(1, abs=1e-6)  # top variance is the generic direction
    assert abs(contrastive["m"][1, 0]) == pytest.approx(1, abs=1e-6)  # contrastive finds the refusal one
    by_energy, captured = module_bases({"m": linear}, {"m": harmful}, rank=None, energy=0.95)
    assert by_energy["m"].shape == (d, 2) and captured["m"] == pytest.approx(1.0)
    by_energy, captured = module_bases({"m": linear}, {"m": harmful}, rank=None, energy=0.5)
    assert by_energy["m"].shape == (d, 1) and captured["m"] == pytest.approx(10 / 11)


def test_task_scaled_init_keeps_directions_at_lora_magnitude():
    from salora.tuner.layer import task_aware_init

    torch.manual_seed(0)
    W = torch.randn(24, 16) * 3
    V_task, _ = torch.linalg.qr(torch.randn(24, 8))
    A0, B0 = task_aware_init(W, V_task, rank=4)
    A1, B1 = task_aware_init(W, V_task, rank=4, scaled=True)
    assert A1.norm().item() == pytest.approx((4 / 3) ** 0.5, rel=1e-5)
    factor = (A0.norm() / A1.norm()).item()
    assert factor > 1.5
    assert torch.allclose(A0, A1 * factor, atol=1e-5) and torch.allclose(B0, B1 * factor, atol=1e-4)


@pytest.mark.parametrize(("init", "projection"), [("task", "both"), ("zero", "input")])  # both guards; the default
def test_input_guard_update_ignores_safety_inputs_and_exports_exactly(init, projection, tiny_model_dir, chat_files, tmp_path):
    import json

    calibrate(str(tiny_model_dir), chat_files["safety"], tmp_path / "safety", TARGETS, rank_safety=4, input_energy=0.9)
    tensors = load_file(str(tmp_path / "safety" / SAFETY_TENSORS))
    meta = json.loads((tmp_path / "safety" / "safety.json").read_text())
    assert all(0 < r < 64 for r in meta["input_ranks"].values())
    train(TrainOptions(model=str(tiny_model_dir), data=str(chat_files["task"]), out=str(tmp_path / "ckpt"), safety=str(tmp_path / "safety"),
                       rank=4, lr=5e-3, max_steps=4, batch_size=4, task_rank=8, init=init, projection=projection))
    export(tmp_path / "ckpt", tmp_path / "peft", "peft")
    deltas = peft_deltas(tmp_path / "peft")
    assert len(deltas) == 4 and json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == (8 if init == "task" else 4)
    for name, delta in deltas.items():
        V, U = tensors[f"{name}.V"], tensors[f"{name}.U"]
        assert delta.norm() > 0
        assert (delta @ U).norm() / delta.norm() < 1e-4
        output_side = (V.T @ delta).norm() / delta.norm()
        assert output_side < 1e-4 if projection == "both" else output_side > 1e-2
    ckpt_meta = json.loads((tmp_path / "ckpt" / "salora_config.json").read_text())
    model, tokenizer = load_model(tiny_model_dir)
    load_salora(model, linear_modules(model, TARGETS), load_file(str(tmp_path / "ckpt" / SALORA_WEIGHTS)), SaLoRAConfig(**ckpt_meta["salora"]).scale)
    base, _ = load_model(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert rel_err(logits(peft_model, tokenizer), logits(model, tokenizer)) < 1e-4
