"""The `salora` command line: calibrate -> train -> export -> eval end to end, and bad input ending
in a one-line error, a non-zero exit and no half-written output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from salora.tuner.config import ALL_LINEAR, PAPER_TARGETS, SaLoRAConfig
from salora_cli.main import main
from tests.conftest import build_tiny_llama, write_jsonl


# tqdm bars that ran before the error, and calibrate's memory estimate (an informational line printed before the work)
PROGRESS = re.compile(r"\d+/\d+ \[|^calibrate: needs about ")


def salora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "salora_cli", *args], capture_output=True, text=True, timeout=600)


def test_pipeline_end_to_end(tiny_model_dir, chat_files, tmp_path):
    """With the defaults: the input guard on all seven linear projections, a standard LoRA start."""
    model = str(tiny_model_dir)
    steps = [
        ("calibrate", "--model", model, "--data", str(chat_files["safety"]), "--out", str(tmp_path / "safety")),
        ("train", "--model", model, "--data", str(chat_files["task"]), "--safety", str(tmp_path / "safety"), "--out",
         str(tmp_path / "ckpt"), "--rank", "4", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3"),
        ("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "adapter")),
        ("eval", "--model", model, "--adapter", str(tmp_path / "adapter"), "--prompts", str(chat_files["prompts"]),
         "--out", str(tmp_path / "eval.json"), "--max-new-tokens", "8", "--label", "salora"),
        ("eval", "--model", model, "--prompts", str(chat_files["prompts"]), "--out", str(tmp_path / "base.json"), "--max-new-tokens", "8"),
        ("compare", str(tmp_path / "base.json"), str(tmp_path / "eval.json"), "--out", str(tmp_path / "refusals.png")),
    ]
    for args in steps:
        proc = salora(*args)
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr[-2000:]}"
    safety = json.loads((tmp_path / "safety" / "safety.json").read_text())
    assert safety["target_modules"] == sorted(ALL_LINEAR) and len(safety["modules"]) == 14  # 7 projections x 2 layers
    assert safety["rank_safety"] == 32 and safety["basis"] == "variance" and safety["response_tokens"] > 0
    assert safety["input_energy"] == 0.9 and sorted(safety["input_ranks"]) == safety["modules"]
    ckpt = json.loads((tmp_path / "ckpt" / "salora_config.json").read_text())
    assert ckpt["salora"] == SaLoRAConfig(rank=4, target_modules=sorted(ALL_LINEAR), init="zero", projection="input").to_dict()
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4  # rank r: a zero-init start
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 4 and len(result["items"]) == 4
    assert result["refusal_rate"] == sum(i["refused"] for i in result["items"]) / 4
    assert set(result["items"][0]) >= {"prompt", "response", "refused"}
    assert (tmp_path / "refusals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("other-llama"), smollm_tokenizer, seed=1)


@pytest.fixture(scope="module")
def safety_dir(tiny_model_dir, chat_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-safety") / "safety"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(chat_files["safety"]), "--out", str(out), "--rank-safety", "4"]) == 0
    return out


def bad_inputs(model: Path, other: Path, files: dict, safety: Path, tmp: Path) -> dict[str, list[str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    malformed = tmp / "malformed.jsonl"
    malformed.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    no_answer = write_jsonl(tmp / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    cal = ["calibrate", "--model", str(model), "--data", str(files["safety"])]
    trn = ["train", "--model", str(model), "--data", str(files["task"]), "--safety", str(safety), "--rank", "2", "--task-rank", "4", "--max-steps", "1"]
    return {
        "missing data": ["calibrate", "--model", str(model), "--data", str(tmp / "nope.jsonl")],
        "empty data": ["calibrate", "--model", str(model), "--data", str(empty)],
        "malformed jsonl": ["train", "--model", str(model), "--data", str(malformed), "--safety", str(safety)],
        "no assistant turn": ["calibrate", "--model", str(model), "--data", str(no_answer)],
        "missing model": ["calibrate", "--model", str(tmp / "no-model"), "--data", str(files["safety"])],
        "unknown target module": [*cal, "--target-modules", "q_proj,qkv_proj"],
        "safety rank above dims": [*cal, "--rank-safety", "999"],
        "train rank above dims": ["train", "--model", str(model), "--data", str(files["task"]), "--safety", str(safety), "--rank", "999"],
        "safety for another base": ["train", "--model", str(other), "--data", str(files["task"]), "--safety", str(safety)],
        "salora without safety": ["train", "--model", str(model), "--data", str(files["task"])],
        "no refusals to keep": [*cal, "--generate-responses", "--max-new-tokens", "4"],
        "output exists": [*trn, "--out-existing"],
        "not a checkpoint": ["export", "--checkpoint", str(safety)],
        "bad prompt file type": ["eval", "--model", str(model), "--prompts", str(safety / "safety.json")],
    }


CASES = [
    "missing data", "empty data", "malformed jsonl", "no assistant turn", "missing model", "unknown target module",
    "safety rank above dims", "train rank above dims", "safety for another base", "salora without safety",
    "no refusals to keep", "output exists", "not a checkpoint", "bad prompt file type",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_error_and_no_output(case, tiny_model_dir, other_model_dir, chat_files, safety_dir, tmp_path, capsys):
    args = bad_inputs(tiny_model_dir, other_model_dir, chat_files, safety_dir, tmp_path)[case]
    work = tmp_path / "work"
    work.mkdir()
    if args[-1] == "--out-existing":
        args, out = args[:-1], tmp_path / "taken"
    else:
        out = work / "out.json" if args[0] == "eval" else work / "out"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(err) == 1 and err[0].startswith(f"salora {args[0]}: error: "), err
    if case == "output exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert list(work.iterdir()) == []  # no partial directories left beside the output


@pytest.fixture(scope="module")
def paper_safety_dir(tiny_model_dir, chat_files, tmp_path_factory) -> Path:
    """`calibrate --preset paper`, with flags that agree with the preset (kept) and one it does not set."""
    out = tmp_path_factory.mktemp("cli-paper-safety") / "safety"
    args = ["calibrate", "--model", str(tiny_model_dir), "--data", str(chat_files["safety"]), "--out", str(out), "--preset", "paper",
            "--target-modules", "v_proj,q_proj", "--rank-safety", "32", "--max-samples", "128", "--batch-size", "4"]
    assert main(args) == 0
    return out


def test_paper_preset_is_the_paper_on_both_commands(paper_safety_dir, tiny_model_dir, chat_files, tmp_path):
    from safetensors.torch import load_file

    safety = json.loads((paper_safety_dir / "safety.json").read_text())
    assert safety["target_modules"] == PAPER_TARGETS and len(safety["modules"]) == 4
    assert (safety["rank_safety"], safety["energy"], safety["basis"], safety["contrast_sequences"]) == (32, None, "variance", 0)
    assert safety["input_energy"] is None and safety["input_ranks"] == {}
    assert safety["sequences"] == 12  # all of them (the preset's 128 samples)
    assert not any(k.endswith(".U") for k in load_file(str(paper_safety_dir / "safety.safetensors")))
    args = ["train", "--model", str(tiny_model_dir), "--data", str(chat_files["task"]), "--safety", str(paper_safety_dir),
            "--out", str(tmp_path / "ckpt"), "--preset", "paper", "--rank", "4", "--max-steps", "1", "--batch-size", "4",
            "--init", "task", "--projection", "output", "--alpha", "4"]  # agree with the preset (alpha = rank)
    assert main(args) == 0
    ckpt = json.loads((tmp_path / "ckpt" / "salora_config.json").read_text())
    paper = SaLoRAConfig(rank=4, alpha=None, target_modules=PAPER_TARGETS, init="task", task_rank=32, projection="output")
    assert ckpt["salora"] == paper.to_dict()


PRESET_CONFLICTS = {
    "calibrate rank-safety": (["calibrate", "--preset", "paper", "--rank-safety", "16"], "--rank-safety 16", "--rank-safety 32"),
    "calibrate max-samples": (["calibrate", "--preset", "paper", "--max-samples", "500"], "--max-samples 500", "--max-samples 128"),
    "calibrate modules": (["calibrate", "--preset", "paper", "--target-modules", "k_proj,o_proj"], "--target-modules k_proj,o_proj",
                          "--target-modules q_proj,v_proj"),
    "calibrate input guard": (["calibrate", "--preset", "paper", "--input-energy", "0.5"], "--input-energy 0.5", "--input-energy off"),
    "calibrate energy": (["calibrate", "--preset", "paper", "--energy", "0.5"], "--energy 0.5", "--energy off"),
    "train alpha": (["train", "--preset", "paper", "--alpha", "64", "--rank", "4"], "--alpha 64", "--alpha equal to --rank"),
    "train init": (["train", "--preset", "paper", "--init", "zero"], "--init zero", "--init task"),
    "train projection": (["train", "--preset", "paper", "--projection", "input"], "--projection input", "--projection output"),
    "train task rank": (["train", "--preset", "paper", "--task-rank", "4"], "--task-rank 4", "--task-rank 32"),
}


@pytest.mark.parametrize("case", sorted(PRESET_CONFLICTS))
def test_explicit_flag_contradicting_the_preset_is_an_error_naming_both(case, tiny_model_dir, chat_files, safety_dir, tmp_path, capsys):
    args, given, preset = PRESET_CONFLICTS[case]
    common = {"calibrate": ["--data", str(chat_files["safety"])],
              "train": ["--data", str(chat_files["task"]), "--safety", str(safety_dir), "--max-steps", "1"]}[args[0]]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([args[0], "--model", str(tiny_model_dir), *common, *args[1:], "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(err) == 1 and err[0].startswith(f"salora {args[0]}: error: "), err
    assert f"{given} contradicts --preset paper, which sets {preset}" in err[0], err
    assert list(tmp_path.iterdir()) == []


def _degenerate(model: Path, files: dict, safety: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    cal = ["calibrate", "--model", str(model), "--data", str(files["safety"])]
    trn = ["train", "--model", str(model), "--data", str(files["task"]), "--safety", str(safety), "--rank", "2", "--max-steps", "2"]
    ev = ["eval", "--model", str(model), "--prompts", str(files["prompts"])]
    return {
        "train max-steps 0": ([*trn, "--max-steps", "0"], "--max-steps"),
        "train max-steps negative": ([*trn, "--max-steps", "-3"], "--max-steps"),
        "train negative lr": ([*trn, "--lr=-1e-4"], "--lr"),
        "train zero lr": ([*trn, "--lr", "0"], "--lr"),
        "train nan lr": ([*trn, "--lr", "nan"], "--lr"),
        "train infinite lr": ([*trn, "--lr", "inf"], "--lr"),
        "train rank 0": ([*trn, "--rank", "0"], "--rank"),
        "train batch 0": ([*trn, "--batch-size", "0"], "--batch-size"),
        "train epochs 0": ([*trn, "--epochs", "0"], "--epochs"),
        "train grad-accum 0": ([*trn, "--grad-accum", "0"], "--grad-accum"),
        "train negative warmup": ([*trn, "--warmup-steps", "-1"], "--warmup-steps"),
        "train warmup past the run": ([*trn, "--warmup-steps", "5"], "--warmup-steps"),
        "train save-every 0": ([*trn, "--save-every", "0"], "--save-every"),
        "train max-length 0": ([*trn, "--max-length", "0"], "--max-length"),
        "train task-rank 0": ([*trn, "--task-rank", "0"], "--task-rank"),
        "train negative alpha": ([*trn, "--alpha", "-8"], "--alpha"),
        "train unknown device": ([*trn, "--device", "tpu"], "--device"),
        "train cuda without one": ([*trn, "--device", "cuda"], "--device"),
        "calibrate rank-safety 0": ([*cal, "--rank-safety", "0"], "--rank-safety"),
        "calibrate max-samples 0": ([*cal, "--max-samples", "0"], "--max-samples"),
        "calibrate batch 0": ([*cal, "--batch-size", "0"], "--batch-size"),
        "calibrate energy 0": ([*cal, "--energy", "0"], "--energy"),
        "calibrate input-energy above 1": ([*cal, "--input-energy", "1.5"], "--input-energy"),
        "calibrate nan energy": ([*cal, "--energy", "nan"], "--energy"),
        "calibrate max-new-tokens 0": ([*cal, "--generate-responses", "--max-new-tokens", "0"], "--max-new-tokens"),
        "calibrate max-length 0": ([*cal, "--max-length", "0"], "--max-length"),
        "eval max-new-tokens 0": ([*ev, "--max-new-tokens", "0"], "--max-new-tokens"),
        "eval batch 0": ([*ev, "--batch-size", "0"], "--batch-size"),
        "align rank 0": (["align", "--rank", "0"], "--rank"),
        "align negative lr": (["align", "--lr=-5e-4"], "--lr"),
        "align batch 0": (["align", "--batch-size", "0"], "--batch-size"),
        "export dtype without merged": (["export", "--checkpoint", str(safety), "--dtype", "bfloat16"], "--dtype"),
    }


DEGENERATE = [
    "train max-steps 0", "train max-steps negative", "train negative lr", "train zero lr", "train nan lr", "train infinite lr",
    "train rank 0", "train batch 0", "train epochs 0", "train grad-accum 0", "train negative warmup", "train warmup past the run",
    "train save-every 0", "train max-length 0", "train task-rank 0", "train negative alpha", "train unknown device",
    "train cuda without one", "calibrate rank-safety 0", "calibrate max-samples 0", "calibrate batch 0", "calibrate energy 0",
    "calibrate input-energy above 1", "calibrate nan energy", "calibrate max-new-tokens 0", "calibrate max-length 0",
    "eval max-new-tokens 0", "eval batch 0", "align rank 0", "align negative lr", "align batch 0", "export dtype without merged",
]


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_numbers_give_one_line_error_and_no_output(case, tiny_model_dir, chat_files, safety_dir, tmp_path, capsys):
    import torch

    if case == "train cuda without one" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, flag = _degenerate(tiny_model_dir, chat_files, safety_dir, tmp_path)[case]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.json" if args[0] == "eval" else work / "out"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(err) == 1 and err[0].startswith(f"salora {args[0]}: error: {flag}"), err
    assert not out.exists()
    assert list(work.iterdir()) == []


def test_default_train_on_a_basis_without_input_guard_says_how_to_fix_it(paper_safety_dir, tiny_model_dir, chat_files, tmp_path, capsys):
    out = tmp_path / "ckpt"
    capsys.readouterr()
    args = ["train", "--model", str(tiny_model_dir), "--data", str(chat_files["task"]), "--safety", str(paper_safety_dir),
            "--out", str(out), "--rank", "4", "--max-steps", "1"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(err) == 1 and err[0].startswith("salora train: error: --projection input needs an input guard"), err
    assert all(fix in err[0] for fix in ("--input-energy", "--preset paper", "--projection output")), err
    assert not out.exists()


def test_lora_needs_no_safety_basis(tiny_model_dir, chat_files, tmp_path):
    args = ["train", "--model", str(tiny_model_dir), "--data", str(chat_files["task"]), "--out", str(tmp_path / "ckpt"),
            "--method", "lora", "--rank", "2", "--max-steps", "1", "--batch-size", "4"]
    assert main(args) == 0
    ckpt = json.loads((tmp_path / "ckpt" / "salora_config.json").read_text())
    assert ckpt["method"] == "lora" and ckpt["safety"] is None and ckpt["salora"]["target_modules"] == ALL_LINEAR
