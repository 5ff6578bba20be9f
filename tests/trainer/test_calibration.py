"""Calibration in one layer-streamed pass: the same bases as the all-modules-at-once reference,
a memory estimate printed first (and a refusal when it does not fit), and peak memory that grows
with the weights, not with layers x d_in^2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import salora.calibrate as cal
from salora.chat import read_chat_jsonl
from salora.models import linear_modules, load_model
from salora.tuner.config import ALL_LINEAR
from salora_cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def projector_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() @ a.double().T - b.double() @ b.double().T).abs().max().item()


@pytest.mark.parametrize("layered", [True, False])
def test_streamed_bases_equal_the_reference(layered, tiny_model_dir, chat_files, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    modules = linear_modules(model, ALL_LINEAR)
    safety, task = read_chat_jsonl(chat_files["safety"]), read_chat_jsonl(chat_files["task"])[:12]
    if not layered:  # the fallback: one full forward per batch with hooks on every module
        monkeypatch.setattr(cal, "decoder_layers", lambda *_: None)
    got = cal.stream_bases(model, tokenizer, safety, modules, 6, contrast=task, input_energy=0.9, progress=None)
    resp, con = cal.record_input_moments(model, tokenizer, safety, modules), cal.record_input_moments(model, tokenizer, task, modules)
    V, _ = cal.module_bases(modules, resp, 6, contrast=con)
    inputs = cal.record_input_moments(model, tokenizer, safety, modules, all_tokens=True)
    inputs_c = cal.record_input_moments(model, tokenizer, task, modules, all_tokens=True)
    # Float32 products and decompositions (float64 sums and finish) against the float64-product
    # reference: the projectors agree to about 1e-7, 2e-5 where eigenvalues nearly tie (a contrastive o_proj).
    for name in modules:
        assert projector_diff(got.V[name], V[name]) < 1e-4
        U, _ = cal.top_directions(inputs[name].xtx / inputs[name].tokens - inputs_c[name].xtx / inputs_c[name].tokens, energy=0.9)
        assert projector_diff(got.U[name], U) < 1e-4
    assert got.response_tokens == resp[next(iter(modules))].tokens
    # q/k/v read one tensor, gate/up another: one accumulator each.
    assert {n.rsplit(".", 1)[1] for n in got.shared_inputs} == {"k_proj", "v_proj", "up_proj"}


def test_wide_modules_get_the_exact_top_directions_without_the_d_out_square_problem():
    torch.manual_seed(0)
    W = torch.randn(48, 16, dtype=torch.float64)
    X = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(3, 0.1, 16, dtype=torch.float64)
    m = cal.Moments(X.T @ X, 200)
    for rank, energy in ((5, None), (None, 0.8)):
        wide, share = cal.wide_output_directions(W, m, rank, energy)
        dense, share_dense = cal.top_directions(cal.output_second_moment(W, m), rank, energy)
        # float32 decompositions on both sides: exact to float32 precision
        assert wide.shape == dense.shape and projector_diff(wide, dense) < 1e-5 and share == pytest.approx(share_dense, rel=1e-6)


def test_calibrate_prints_its_memory_need_and_progress_then_refuses_what_does_not_fit(tiny_model_dir, chat_files, tmp_path, capsys,
                                                                                   monkeypatch):
    args = ["calibrate", "--model", str(tiny_model_dir), "--data", str(chat_files["safety"]), "--target-modules", "q_proj,v_proj",
            "--rank-safety", "4"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    err = capsys.readouterr().err
    assert "calibrate: needs about " in err and " available" in err
    assert "safety inputs" in err and "layers (forward + decomposition)" in err
    meta = json.loads((tmp_path / "ok" / "safety.json").read_text())
    assert meta["memory_estimate_bytes"] > 0
    monkeypatch.setattr(cal, "_available_bytes", lambda device: 1024)
    assert main([*args, "--out", str(tmp_path / "big")]) == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("salora calibrate: error: calibration needs about "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from salora.calibrate import calibrate
from salora.tuner.config import ALL_LINEAR
calibrate({model!r}, {data!r}, {out!r}, list(ALL_LINEAR), rank_safety=8, input_energy=0.9, device="cpu", dtype="float32",
          log=lambda line: None)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"peak": peak}}))
"""


def _llama(out: Path, tokenizer, layers: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_peak_memory_grows_with_the_weights_not_with_layers(smollm_tokenizer, chat_files, tmp_path):
    """A 6-layer model (hidden 1024) against a 2-layer one: the peak (the process's VmHWM) grows by no
    more than 1.25x the extra weights (1.03x measured). The former all-modules-at-once, two-pass accumulation held about
    226 MB of float64 moments per layer here, over 4x the 51 MB of a layer's weights."""
    peaks, weights = {}, {}
    for layers in (2, 6):
        weights[layers] = _llama(tmp_path / f"m{layers}", smollm_tokenizer, layers)
        code = PROBE.format(root=str(ROOT), model=str(tmp_path / f"m{layers}"), data=str(chat_files["safety"]), out=str(tmp_path / f"s{layers}"))
        # A fixed mmap threshold: glibc's default one moves with what was freed, so the heap's
        # high-water mark (and VmHWM) varied by 150 MB from run to run of the same calibration.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[layers] = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    extra_weights = weights[6] - weights[2]
    assert extra_weights > 200e6
    assert peaks[6] - peaks[2] <= 1.25 * extra_weights, (peaks, extra_weights)
