"""Chat data: reading JSONL of `messages`, prompt files, and tokenising with the loss on
assistant tokens only (the same mask selects the response tokens whose activations calibrate
the safety basis)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from salora.datasets import json_line
from salora.errors import SaLoRAError
from salora.messages import ROLES, Messages

IGNORE = -100


def _check_messages(messages: object, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise SaLoRAError(f"{where}: `messages` must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SaLoRAError(f"{where}: each message needs a role in {sorted(ROLES)} and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of objects; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SaLoRAError(f"{path}: no such file")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            lines = list(f)  # split at newlines only (str.splitlines would also split at U+2028 in a string)
    except UnicodeDecodeError as e:
        raise SaLoRAError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json_line(line, f"{path}:{lineno}")
        if not isinstance(row, dict):
            raise SaLoRAError(f"{path}:{lineno}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise SaLoRAError(f"{path}: file is empty")
    return rows


def read_chat_jsonl(path: str | Path, need_assistant: bool = True) -> list[Messages]:
    """Conversations from JSONL rows holding `messages` (or a bare `prompt`, taken as one user turn)."""
    return conversations_from_rows(read_jsonl(path), path, need_assistant)


def read_chat_data(path: str | Path, need_assistant: bool = True) -> list[Messages]:
    """Conversations from JSONL, a parquet file or a local HF `datasets` directory (same records)."""
    from salora import hf_data

    if hf_data.is_hf_data(path):
        return conversations_from_rows(hf_data.read_rows(path), path, need_assistant)
    return read_chat_jsonl(path, need_assistant)


def conversations_from_rows(rows: list[dict], path: str | Path, need_assistant: bool) -> list[Messages]:
    """Check and convert records; errors name the source and the record's number (from 1)."""
    conversations = []
    for lineno, row in enumerate(rows, 1):
        where = f"{path}: record {lineno}"
        if row.get("messages") is not None or "prompt" not in row:  # a table's missing column value is None
            if "messages" not in row:
                raise SaLoRAError(f"{where}: needs `messages` (or `prompt`)")
            messages = _check_messages(row["messages"], where)
        elif isinstance(row["prompt"], str):
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise SaLoRAError(f"{where}: needs `messages` (or `prompt`)")
        if need_assistant and messages[-1]["role"] != "assistant":
            raise SaLoRAError(f"{where}: the last message must be the assistant's answer")
        conversations.append(messages)
    return conversations


def read_prompts(path: str | Path) -> list[Messages]:
    """Prompts for evaluation from `.txt` (one a line), `.jsonl` (`prompt` or `messages`) or `.csv`
    (a `goal` or `prompt` column). A trailing assistant turn in `messages` is dropped."""
    path = Path(path)
    if not path.is_file():
        raise SaLoRAError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [[{"role": "user", "content": line.strip()}] for line in path.read_text("utf-8").splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = [m[:-1] if m[-1]["role"] == "assistant" else m for m in read_chat_jsonl(path, need_assistant=False)]
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            column = next((c for c in ("goal", "prompt") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise SaLoRAError(f"{path}: needs a `goal` or `prompt` column")
            prompts = [[{"role": "user", "content": row[column]}] for row in reader if row[column].strip()]
    else:
        raise SaLoRAError(f"{path}: prompts must be .txt, .jsonl or .csv")
    if not prompts:
        raise SaLoRAError(f"{path}: no prompts in file")
    return prompts


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, max_length: int) -> Example:
    """Tokenise a conversation with labels only on assistant turns (their closing tag included,
    so the model learns to stop). Segments are cut at turn boundaries, where the chat template
    puts special tokens, so tokenising them separately equals tokenising the whole."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        else:
            prefix = None
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        for text, is_answer in ((prefix, False), (full, message["role"] == "assistant")):
            if text is None:
                continue
            if not text.startswith(rendered):
                raise SaLoRAError("the chat template does not render conversations incrementally")
            piece = text[len(rendered) :]
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if is_answer else [IGNORE] * len(ids)
            rendered = text
    return Example(input_ids[:max_length], labels[:max_length])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for teacher-forced training and activation recording."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
