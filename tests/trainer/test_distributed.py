"""Data parallel training with torchrun on CPU (gloo): N processes with --grad-accum K train the
adapter of one process with --grad-accum N*K, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from salora.export import export
from salora.train import CHECKPOINT_CONFIG, TRAIN_LOG
from salora_cli.main import main
from tests.trainer.conftest import delta_rel_diff, peft_deltas

SALORA = Path(sys.executable).parent / "salora"


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "--no-python", str(SALORA), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def test_two_processes_equal_one_with_twice_the_accumulation(tiny_model_dir, chat_files, qv_safety, tmp_path):
    common = ["train", "--model", str(tiny_model_dir), "--data", str(chat_files["task"]), "--safety", str(qv_safety), "--rank", "4",
              "--lr", "5e-3", "--max-steps", "4", "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "--save-every", "2"]
    proc = torchrun(2, [*common, "--out", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*common, "--grad-accum", "2", "--out", str(tmp_path / "single")]) == 0
    # Control: two processes without accumulation against one process alone (global batch 8 vs 4).
    assert main([*common, "--out", str(tmp_path / "half")]) == 0
    for name in ("ddp", "single", "half"):
        export(tmp_path / name, tmp_path / f"{name}-peft", "peft")
    ddp, single = peft_deltas(tmp_path / "ddp-peft"), peft_deltas(tmp_path / "single-peft")
    assert delta_rel_diff(ddp, single) < 1e-3
    assert delta_rel_diff(peft_deltas(tmp_path / "half-peft"), single) > 1e-2
    meta = json.loads((tmp_path / "ddp" / CHECKPOINT_CONFIG).read_text())
    assert meta["processes"] == 2 and meta["global_batch"] == 8
    ddp_log = [json.loads(x) for x in (tmp_path / "ddp" / TRAIN_LOG).read_text().splitlines()]
    single_log = [json.loads(x) for x in (tmp_path / "single" / TRAIN_LOG).read_text().splitlines()]
    assert [round(e["loss"], 5) for e in ddp_log] == [round(e["loss"], 5) for e in single_log]  # the global batch's mean loss
    # Rank 0 alone wrote: one output, its checkpoint, no partial directory of another rank.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-2"]
    assert proc.stdout.count("-> ") == 1  # one summary line, from rank 0
