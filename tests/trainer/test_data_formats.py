"""`--data` as HF users keep it: a local `datasets` directory (save_to_disk) or a parquet file, with
the same records a JSONL file holds, train the same adapter; bad ones get one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from salora.chat import read_chat_data, read_chat_jsonl
from salora_cli.main import main
from tests.trainer.conftest import delta_rel_diff, peft_deltas
from tests.trainer.test_loop import run


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def formats(chat_files, tmp_path) -> dict[str, Path]:
    """The task conversations as a Dataset directory, a DatasetDict directory and a parquet file,
    with an extra column and `messages` carrying an extra key, as exported datasets often do."""
    rows = [{**r, "source": "arithmetic"} for r in rows_of(chat_files["task"])]
    ds = Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dsdict"))
    ds.to_parquet(str(tmp_path / "task.parquet"))
    return {"dataset": tmp_path / "ds", "dataset_dict": tmp_path / "dsdict", "parquet": tmp_path / "task.parquet"}


def test_every_format_reads_the_same_conversations(formats, chat_files):
    expected = read_chat_jsonl(chat_files["task"])
    for kind, path in formats.items():
        assert read_chat_data(path) == expected, kind


def test_a_datasets_directory_and_a_parquet_file_train_what_the_jsonl_trains(formats, tiny_model_dir, chat_files, qv_safety, tmp_path):
    base = {"model": str(tiny_model_dir), "safety": str(qv_safety), "max_steps": 2}
    reference = peft_deltas(run(tmp_path, "jsonl", data=str(chat_files["task"]), **base))
    for kind in ("dataset", "parquet"):
        assert delta_rel_diff(peft_deltas(run(tmp_path, kind, data=str(formats[kind]), **base)), reference) < 1e-6, kind
    # Control: other data trains another adapter, so the comparison can fail.
    other = tmp_path / "other.parquet"
    Dataset.from_list(rows_of(chat_files["safety"])).to_parquet(str(other))
    assert delta_rel_diff(peft_deltas(run(tmp_path, "other", data=str(other), **base)), reference) > 1e-3


def test_calibrate_reads_a_parquet_file(tiny_model_dir, chat_files, tmp_path):
    data = tmp_path / "safety.parquet"
    Dataset.from_list(rows_of(chat_files["safety"])).to_parquet(str(data))
    out = tmp_path / "safety"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(data), "--target-modules", "q_proj", "--rank-safety", "2",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "safety.json").read_text())
    assert meta["sequences"] == len(rows_of(chat_files["safety"]))


def _bad(tmp: Path, chat_files) -> dict[str, tuple[Path, str]]:
    plain = tmp / "plain-dir"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a dataset")
    no_train = tmp / "no-train"
    ds = Dataset.from_list(rows_of(chat_files["task"]))
    DatasetDict({"a": ds, "b": ds}).save_to_disk(str(no_train))
    no_answer = tmp / "no-answer.parquet"
    Dataset.from_list([{"prompt": "What is 2 plus 2?"}]).to_parquet(str(no_answer))
    wrong = tmp / "wrong.parquet"
    Dataset.from_list([{"text": "hello"}]).to_parquet(str(wrong))
    broken = tmp / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    return {
        "plain directory": (plain, "not a `datasets` directory"),
        "DatasetDict without train": (no_train, "without a `train` split (it has a, b)"),
        "prompt without answer": (no_answer, "record 1: the last message must be the assistant's answer"),
        "no messages column": (wrong, "record 1: needs `messages`"),
        "broken parquet": (broken, "not a readable parquet file"),
        "missing parquet": (tmp / "missing.parquet", "no such file"),
    }


@pytest.mark.parametrize("case", ["plain directory", "DatasetDict without train", "prompt without answer", "no messages column",
                                  "broken parquet", "missing parquet"])
def test_bad_data_gets_one_line_error_and_no_output(case, tiny_model_dir, chat_files, qv_safety, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data, message = _bad(tmp_path / "data", chat_files)[case]
    work = tmp_path / "work"
    work.mkdir()
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--safety", str(qv_safety), "--rank", "2",
                 "--max-steps", "1", "--out", str(work / "out")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("salora train: error: ") and message in err[0], err
    assert list(work.iterdir()) == []
