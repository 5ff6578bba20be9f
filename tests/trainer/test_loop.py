"""The training loop: gradient accumulation, LR schedules with warmup, gradient checkpointing,
and checkpoints that resume exactly after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from salora.export import export
from salora.train import SALORA_WEIGHTS, TRAIN_LOG, TrainOptions, train
from salora_cli.main import main
from tests.trainer.conftest import delta_rel_diff, peft_deltas

ROOT = Path(__file__).resolve().parents[2]


def run(tmp: Path, name: str, method: str = "salora", **kw) -> Path:
    """Train with the shared defaults; returns the exported PEFT adapter."""
    opts = dict(model=kw.pop("model"), data=kw.pop("data"), safety=kw.pop("safety", None), rank=4, lr=5e-3, max_steps=3,
                batch_size=4, device="cpu", dtype="float32", method=method)
    opts.update(kw)
    ckpt = tmp / f"{name}-ckpt"
    train(TrainOptions(out=str(ckpt), **opts))
    export(ckpt, tmp / f"{name}-peft", "peft")
    return tmp / f"{name}-peft"


@pytest.fixture()
def base(tiny_model_dir, chat_files, qv_safety):
    return {"model": str(tiny_model_dir), "data": str(chat_files["task"]), "safety": str(qv_safety)}


def test_grad_accum_trains_the_global_batch(base, tmp_path):
    """batch 8 = batch 4 x accum 2 = batch 2 x accum 4 (one global batch of 8 per step, same order)."""
    whole = peft_deltas(run(tmp_path, "b8", batch_size=8, **base))
    for b, k in ((4, 2), (2, 4)):
        assert delta_rel_diff(peft_deltas(run(tmp_path, f"b{b}k{k}", batch_size=b, grad_accum=k, **base)), whole) < 1e-5
    # Control: a global batch of 4 trains a different adapter, so the comparison above can fail.
    assert delta_rel_diff(peft_deltas(run(tmp_path, "b4k1", batch_size=4, **base)), whole) > 1e-3


def test_grad_accum_weights_tokens_not_micro_batches(base, tmp_path):
    """The loss is the mean over the global batch's target tokens: micro-batches with more answer
    tokens weigh more, as in one batch. Conversations of very different lengths make it matter."""
    rows = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": ("ok " * (1 + 20 * (i % 2))).strip()}]}
            for i in range(8)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = {**base, "data": str(data), "max_steps": 2}
    whole = peft_deltas(run(tmp_path, "u8", batch_size=8, **kw))
    split = peft_deltas(run(tmp_path, "u1k8", batch_size=1, grad_accum=8, **kw))
    assert delta_rel_diff(split, whole) < 1e-5


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_with_warmup(schedule, base, tmp_path):
    lr, warmup, steps = 4e-3, 2, 6
    run(tmp_path, schedule, lr=lr, lr_schedule=schedule, warmup_steps=warmup, max_steps=steps, **base)
    got = [e["lr"] for e in map(json.loads, (tmp_path / f"{schedule}-ckpt" / TRAIN_LOG).read_text().splitlines())]

    def expected(s: int) -> float:  # transformers' schedules (what Trainer users know)
        if s < warmup:
            return lr * s / warmup
        progress = (s - warmup) / (steps - warmup)
        return lr * {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]

    assert got == pytest.approx([expected(s) for s in range(steps)], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("method", ["salora", "lora"])
def test_gradient_checkpointing_trains_the_same_adapter(method, base, tmp_path):
    plain = peft_deltas(run(tmp_path, "plain", method=method, **base))
    checkpointed = peft_deltas(run(tmp_path, "ckpt", method=method, gradient_checkpointing=True, **base))
    assert delta_rel_diff(checkpointed, plain) < 1e-5


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import salora.train as t
real = t._Run.save_resumable
def save_then_die(self, root, step, log):
    real(self, root, step, log)
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill right after a checkpoint, mid-run
t._Run.save_resumable = save_then_die
from salora_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("method", ["salora", "lora"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(method, base, tmp_path, capsys):
    # 32 conversations, batch 4: 8 steps an epoch; 11 steps cross an epoch boundary after the kill at step 6.
    args = ["train", "--model", base["model"], "--data", base["data"], "--method", method, "--rank", "4", "--lr", "5e-3",
            "--max-steps", "11", "--batch-size", "2", "--grad-accum", "2", "--lr-schedule", "cosine", "--warmup-steps", "2",
            "--save-every", "3", "--device", "cpu", "--dtype", "float32"]
    if method == "salora":
        args += ["--safety", base["safety"]]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT), kill_at=6), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = tmp_path / ".resumed.partial"
    assert not out.exists() and sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-3", "step-6"]

    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2  # without --resume: refused, checkpoints kept
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("salora train: error: ") and "--resume" in err[-1] and (partial / "checkpoints" / "step-6").is_dir()

    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert not partial.exists()
    whole_log = [json.loads(x) for x in (tmp_path / "whole" / TRAIN_LOG).read_text().splitlines()]
    resumed_log = [json.loads(x) for x in (out / TRAIN_LOG).read_text().splitlines()]
    assert [e["step"] for e in resumed_log] == list(range(1, 12))
    assert [(e["loss"], e["lr"]) for e in resumed_log] == [(e["loss"], e["lr"]) for e in whole_log]
    if method == "salora":
        a, b = load_file(str(tmp_path / "whole" / SALORA_WEIGHTS)), load_file(str(out / SALORA_WEIGHTS))
    else:
        a, b = load_file(str(tmp_path / "whole" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on the CPU


def test_resume_refuses_changed_options_and_a_run_killed_before_any_checkpoint_restarts(base, tmp_path, capsys):
    args = ["train", "--model", base["model"], "--data", base["data"], "--safety", base["safety"], "--rank", "4",
            "--max-steps", "4", "--batch-size", "4", "--save-every", "2", "--device", "cpu"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT), kill_at=2), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    capsys.readouterr()
    assert main([*args, "--lr", "1e-3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot resume" in err[-1] and "lr=" in err[-1], err
    # A partial directory with no checkpoint (a kill before the first) is just removed.
    partial = tmp_path / ".other.partial"
    partial.mkdir()
    (partial / TRAIN_LOG).write_text("")
    assert main([*args[:-4], "--out", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / SALORA_WEIGHTS).is_file() and not partial.exists()


@pytest.mark.parametrize("method", ["salora", "lora"])
def test_gradient_checkpointing_recomputes_the_layers_in_backward(method, base, chat_files):
    """Checkpointing is really on: each adapted layer's forward runs twice per micro-batch (forward
    and recomputation), once without it."""
    from salora.chat import read_chat_jsonl
    from salora.distributed import World
    from salora.train import _Run

    calls = {}
    for checkpointing in (False, True):
        opts = TrainOptions(out="unused", method=method, rank=4, max_steps=1, batch_size=4, device="cpu", dtype="float32",
                            gradient_checkpointing=checkpointing, **base)
        run = _Run(opts, World(), torch.device("cpu"), torch.float32, read_chat_jsonl(chat_files["task"]))
        layer = next(m for n, m in run.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        count = [0]
        layer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        run.model.train()  # as the loop does; checkpointing acts in training mode only
        run.step(0)
        calls[checkpointing] = count[0]
    assert calls == {False: 1, True: 2}
