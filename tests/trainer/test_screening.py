"""Training-data screening: conversations answering with compliance a request the base refuses are
listed; above the threshold `train` refuses with a report and writes nothing else; `--no-screen`
skips it; the checkpoint records what ran."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from salora.datasets import harmful_prompts
from salora_cli.main import main
from tests.conftest import write_jsonl

PROGRESS = re.compile(r"\d+/\d+ \[")
COMPLIANCE = "Sure, here is how you do that. First, gather what you need, then follow these steps one by one."


def train_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", str(data), "--method", "lora", "--rank", "2", "--max-steps", "1", "--batch-size", "2",
            "--max-length", "64", "--out", str(out), *extra]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]


def test_the_checkpoint_records_the_screening_or_that_it_was_skipped(tiny_model_dir, chat_files, tmp_path, capsys):
    assert main(train_args(str(tiny_model_dir), chat_files["task"], tmp_path / "screened")) == 0
    assert "screening: 0 of 32 conversations flagged" in capsys.readouterr().out
    record = json.loads((tmp_path / "screened" / "salora_config.json").read_text())["screening"]
    assert record["ran"] and record["passed"] and record["judge"] == "keyword" and record["report"] == "screening.json"
    assert (record["conversations"], record["flagged_conversations"], record["threshold"]) == (32, 0, 0.05)
    report = json.loads((tmp_path / "screened" / "screening.json").read_text())
    assert report["flagged"] == [] and report["compliant_answers"] == 32

    assert main(train_args(str(tiny_model_dir), chat_files["task"], tmp_path / "skipped", "--no-screen")) == 0
    assert "screening skipped (--no-screen)" in capsys.readouterr().out
    assert json.loads((tmp_path / "skipped" / "salora_config.json").read_text())["screening"] == {"ran": False}
    assert not (tmp_path / "skipped" / "screening.json").exists()


def test_refusals_in_the_data_cost_no_generation(tiny_model_dir, chat_files, tmp_path):
    assert main(train_args(str(tiny_model_dir), chat_files["safety"], tmp_path / "out")) == 0
    record = json.loads((tmp_path / "out" / "salora_config.json").read_text())["screening"]
    assert (record["answers"], record["compliant_answers"], record["flagged_conversations"]) == (12, 0, 0)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_a_threshold_outside_0_1_is_refused(value, tiny_model_dir, chat_files, tmp_path, capsys):
    assert main(train_args(str(tiny_model_dir), chat_files["task"], tmp_path / "out", f"--screen-threshold={value}")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("salora train: error: --screen-threshold must be"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_harmful_requests_answered_with_compliance_stop_training_with_a_report(tmp_path, capsys):
    """The embedded (aligned) base refuses the project's harmful requests, so data answering them
    with compliance is flagged, turn by turn; benign turns are not."""
    harmful = [h.prompt for h in harmful_prompts("train")[:6]]
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": COMPLIANCE}]} for p in harmful]
    rows += [{"messages": [{"role": "user", "content": f"What is {a} plus {a + 3}?"}, {"role": "assistant", "content": f"{2 * a + 3}"}]}
             for a in range(1, 7)]
    rows.insert(3, {"messages": [{"role": "user", "content": harmful[0]}, {"role": "assistant", "content": "I'm sorry, but I can't help with that."}]})
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    work = tmp_path / "work"
    work.mkdir()
    capsys.readouterr()
    assert main(train_args("embedded", data, work / "out")) == 2
    err = error_lines(capsys)
    report_path = work / "out.screening.json"
    assert len(err) == 1 and err[0].startswith("salora train: error: screening: "), err
    assert "training refused" in err[0] and str(report_path) in err[0] and "--no-screen" in err[0], err
    assert sorted(p.name for p in work.iterdir()) == ["out.screening.json"]  # the report, nothing else
    report = json.loads(report_path.read_text())
    harmful_records = {i + 1 for i, r in enumerate(rows) if r["messages"][0]["content"] in harmful and r["messages"][1]["content"] == COMPLIANCE}
    flagged = {f["record"] for f in report["flagged"]}
    # The base refuses 4 of these 6 in words the keyword judge knows (measured); none of the sums.
    assert flagged <= harmful_records and len(flagged) >= 3, report["flagged"]
    assert report["compliant_answers"] == 12 and not report["passed"]
    assert all(f["answer"] == COMPLIANCE and f["base_answer"] for f in report["flagged"])

    # A threshold above the flagged share trains, and the checkpoint records what was flagged.
    assert main(train_args("embedded", data, work / "tolerant", "--screen-threshold", "0.9")) == 0
    record = json.loads((work / "tolerant" / "salora_config.json").read_text())["screening"]
    assert record["passed"] and record["flagged_conversations"] == len(flagged) and record["threshold"] == 0.9
    assert {f["record"] for f in json.loads((work / "tolerant" / "screening.json").read_text())["flagged"]} == flagged
