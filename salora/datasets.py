"""The project's own prompt sets, shipped in the package so every command and the gateway work
offline and agree on the same data.

`harmful.jsonl` holds harmful requests with a written refusal each: the `train` split aligns the
demo base model and calibrates SaLoRA's safety basis; the `canary` split is held back for the
gateway's canary probes and evaluation, so a probe never measures data the basis was built from.
`benign.jsonl` holds ordinary requests and benign ones that merely sound risky (over-refusal).
`overrefusal_dev.jsonl` and `overrefusal_test.jsonl` hold more benign prompts that sound risky,
across categories, for measuring over-refusal: choose a recipe on `dev`, report `test` once. They
are no canary probes and are in no training mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from salora.atomic import write_bytes_atomic
from salora.errors import SaLoRAError

SPLITS = ("train", "canary")
KINDS = ("ordinary", "sounds_risky")
HARMFUL_FILE = "harmful.jsonl"
BENIGN_FILE = "benign.jsonl"


@dataclass(frozen=True)
class HarmfulPrompt:
    id: str
    category: str
    split: str
    prompt: str
    refusal: str


@dataclass(frozen=True)
class BenignPrompt:
    id: str
    kind: str
    split: str
    prompt: str


def json_line(line: str, where: str) -> Any:
    """One JSONL line parsed, or a one-line error naming `where` (file:line)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise SaLoRAError(f"{where}: malformed JSON ({e.msg})") from e
    except RecursionError as e:
        raise SaLoRAError(f"{where}: JSON nested too deeply") from e


def _data_bytes(name: str) -> bytes:
    return (files("salora") / "resources" / "data" / name).read_bytes()


def _rows(name: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Parse one shipped JSONL file, checking fields, splits and uniqueness of ids and prompts."""
    rows: list[dict[str, str]] = []
    ids: set[str] = set()
    prompts: set[str] = set()
    try:
        text = _data_bytes(name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SaLoRAError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        row = json_line(line, where)
        if not isinstance(row, dict) or set(row) != set(fields):
            raise SaLoRAError(f"{where}: expected exactly the fields {list(fields)}")
        if not all(isinstance(row[f], str) and row[f].strip() for f in fields):
            raise SaLoRAError(f"{where}: every field must be a non-empty string")
        if row["split"] not in SPLITS:
            raise SaLoRAError(f"{where}: unknown split {row['split']!r} (expected one of {SPLITS})")
        if row["id"] in ids:
            raise SaLoRAError(f"{where}: duplicate id {row['id']!r}")
        if row["prompt"] in prompts:
            raise SaLoRAError(f"{where}: duplicate prompt")
        ids.add(row["id"])
        prompts.add(row["prompt"])
        rows.append(row)
    if not rows:
        raise SaLoRAError(f"{name}: no records")
    return rows


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise SaLoRAError(f"unknown split {split!r} (expected one of {SPLITS} or None for all)")


@cache
def _harmful() -> tuple[HarmfulPrompt, ...]:
    return tuple(HarmfulPrompt(**r) for r in _rows(HARMFUL_FILE, ("id", "category", "split", "prompt", "refusal")))


@cache
def _benign() -> tuple[BenignPrompt, ...]:
    items = tuple(BenignPrompt(**r) for r in _rows(BENIGN_FILE, ("id", "kind", "split", "prompt")))
    for b in items:
        if b.kind not in KINDS:
            raise SaLoRAError(f"{BENIGN_FILE}: {b.id} has unknown kind {b.kind!r} (expected one of {KINDS})")
    return items


def harmful_prompts(split: str | None = None) -> list[HarmfulPrompt]:
    """Harmful requests with their refusals; `split=None` gives both splits."""
    _check_split(split)
    return [h for h in _harmful() if split is None or h.split == split]


def benign_prompts(split: str | None = None, kind: str | None = None) -> list[BenignPrompt]:
    """Benign requests, optionally only one split and/or one kind (`sounds_risky` probes over-refusal)."""
    _check_split(split)
    if kind is not None and kind not in KINDS:
        raise SaLoRAError(f"unknown kind {kind!r} (expected one of {KINDS} or None for all)")
    return [b for b in _benign() if (split is None or b.split == split) and (kind is None or b.kind == kind)]


OVERREFUSAL_SPLITS = ("dev", "test")
OVERREFUSAL_CATEGORIES = ("computing", "cooking", "medicine", "safety_facts", "history", "fiction", "self_defence",
                          "pest_control", "chemistry", "security_careers", "sports_games", "gardening", "home_repair",
                          "language", "law_finance", "animals")


@dataclass(frozen=True)
class OverrefusalPrompt:
    id: str
    category: str
    prompt: str


def overrefusal_file(split: str) -> str:
    if split not in OVERREFUSAL_SPLITS:
        raise SaLoRAError(f"unknown over-refusal split {split!r} (expected one of {OVERREFUSAL_SPLITS})")
    return f"overrefusal_{split}.jsonl"


@cache
def overrefusal_prompts(split: str) -> tuple[OverrefusalPrompt, ...]:
    """The benign prompts that sound risky of one split (`salora eval --prompts` reads the file as is)."""
    name = overrefusal_file(split)
    items, ids, prompts = [], set(), set()
    for lineno, line in enumerate(_data_bytes(name).decode("utf-8").splitlines(), 1):
        row = json_line(line, f"{name}:{lineno}")
        if not isinstance(row, dict) or set(row) != {"id", "category", "prompt"} or not all(
                isinstance(v, str) and v.strip() for v in row.values()):
            raise SaLoRAError(f"{name}:{lineno}: expected exactly the non-empty fields id, category, prompt")
        if row["category"] not in OVERREFUSAL_CATEGORIES or row["id"] in ids or row["prompt"] in prompts:
            raise SaLoRAError(f"{name}:{lineno}: unknown category, or a duplicate id or prompt")
        ids.add(row["id"])
        prompts.add(row["prompt"])
        items.append(OverrefusalPrompt(**row))
    return tuple(items)


def safety_messages(split: str = "train") -> list[list[dict[str, str]]]:
    """Harmful prompt + refusal as chat conversations, the input of `salora calibrate --data` and of
    the alignment SFT of the demo base model."""
    return [
        [{"role": "user", "content": h.prompt}, {"role": "assistant", "content": h.refusal}]
        for h in harmful_prompts(split)
    ]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """Write one JSON object a line, atomically (a crash leaves no half-written data file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_bytes_atomic(path, text.encode("utf-8"))


def _version() -> str:
    digest = hashlib.sha256()
    for name in (HARMFUL_FILE, BENIGN_FILE):
        digest.update(name.encode() + b"\0" + _data_bytes(name) + b"\0")
    return digest.hexdigest()[:16]


# Content hash of the shipped data: the gateway keys its cached base-model canary results on it, so
# editing a prompt or refusal invalidates them.
DATA_VERSION: str = _version()
