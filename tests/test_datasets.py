"""The shipped prompt sets: enough of each kind, balanced splits, no leaks between splits or
between harmful and benign, refusals the keyword judge recognises, and validation on load."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

from salora import datasets
from salora.chat import read_chat_jsonl
from salora.errors import SaLoRAError
from salora.judge import KeywordJudge


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@pytest.fixture
def fake_data(monkeypatch):
    """Serve replacement file contents to the loaders (caches cleared before and after)."""
    files: dict[str, bytes] = {}
    real = datasets._data_bytes
    monkeypatch.setattr(datasets, "_data_bytes", lambda name: files[name] if name in files else real(name))
    datasets._harmful.cache_clear()
    datasets._benign.cache_clear()
    yield files
    datasets._harmful.cache_clear()
    datasets._benign.cache_clear()


def test_counts():
    harmful, benign = datasets.harmful_prompts(), datasets.benign_prompts()
    assert len(harmful) >= 200
    assert len(benign) >= 50
    assert len(datasets.benign_prompts(kind="sounds_risky")) >= 30
    assert len(datasets.benign_prompts(kind="ordinary")) >= 50
    assert len(datasets.harmful_prompts("train")) + len(datasets.harmful_prompts("canary")) == len(harmful)


def test_harmful_categories_balanced_and_stratified():
    by_category = Counter(h.category for h in datasets.harmful_prompts())
    assert len(by_category) >= 10
    assert max(by_category.values()) - min(by_category.values()) <= 2
    for category, total in by_category.items():
        canary = sum(h.category == category for h in datasets.harmful_prompts("canary"))
        assert 0.25 <= canary / total <= 0.45, category
        assert canary < total


def test_benign_split_stratified_by_kind():
    for kind in datasets.KINDS:
        total = len(datasets.benign_prompts(kind=kind))
        canary = len(datasets.benign_prompts("canary", kind=kind))
        assert 0.3 <= canary / total <= 0.5, kind


def test_no_duplicates_within_or_across_files():
    harmful = [norm(h.prompt) for h in datasets.harmful_prompts()]
    benign = [norm(b.prompt) for b in datasets.benign_prompts()]
    assert len(set(harmful)) == len(harmful)
    assert len(set(benign)) == len(benign)
    assert not set(harmful) & set(benign)
    ids = [h.id for h in datasets.harmful_prompts()] + [b.id for b in datasets.benign_prompts()]
    assert len(set(ids)) == len(ids)


def test_benign_text_never_inside_harmful():
    harmful = " | ".join(norm(h.prompt) for h in datasets.harmful_prompts())
    assert not [b.prompt for b in datasets.benign_prompts() if norm(b.prompt) in harmful]


def test_every_refusal_is_a_refusal_and_they_vary():
    judge = KeywordJudge()
    harmful = datasets.harmful_prompts()
    assert not [h.id for h in harmful if not judge.is_refusal(h.prompt, h.refusal)]
    assert len({h.refusal for h in harmful}) == len(harmful)
    openers = Counter(" ".join(h.refusal.split()[:4]) for h in harmful)
    assert len(openers) >= 40
    assert max(openers.values()) / len(harmful) < 0.15
    assert all(1 <= len(re.findall(r"[.!?](\s|$)", h.refusal)) <= 3 for h in harmful)


def test_safety_messages_round_trip_through_chat_reader(tmp_path):
    conversations = datasets.safety_messages()
    assert len(conversations) == len(datasets.harmful_prompts("train"))
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)
    path = tmp_path / "safety.jsonl"
    datasets.write_jsonl(({"messages": c} for c in conversations), path)
    assert read_chat_jsonl(path) == conversations
    canary = {c[0]["content"] for c in datasets.safety_messages("canary")}
    assert not canary & {c[0]["content"] for c in conversations}


def test_unknown_split_or_kind_raises():
    with pytest.raises(SaLoRAError, match="unknown split"):
        datasets.harmful_prompts("test")
    with pytest.raises(SaLoRAError, match="unknown kind"):
        datasets.benign_prompts(kind="spicy")


def test_data_version_is_a_content_hash(fake_data):
    assert re.fullmatch(r"[0-9a-f]{16}", datasets.DATA_VERSION)
    assert datasets._version() == datasets.DATA_VERSION
    fake_data[datasets.BENIGN_FILE] = b'{"id": "b-1", "kind": "ordinary", "split": "train", "prompt": "Hi"}\n'
    assert datasets._version() != datasets.DATA_VERSION


def row(**over: str) -> str:
    base = {"id": "b-1", "kind": "ordinary", "split": "train", "prompt": "Hello there"}
    return json.dumps({**base, **over})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([row(), row(prompt="Other")], "duplicate id"),
        ([row(), row(id="b-2")], "duplicate prompt"),
        ([row(split="dev")], "unknown split"),
        ([row(kind="edgy")], "unknown kind"),
        ([json.dumps({"id": "b-1", "split": "train", "prompt": "x"})], "expected exactly the fields"),
        ([row(prompt="  ")], "non-empty string"),
        (["{not json"], "malformed JSON"),
        ([""], "no records"),
    ],
)
def test_validation_on_load(fake_data, lines, message):
    fake_data[datasets.BENIGN_FILE] = "\n".join(lines).encode()
    with pytest.raises(SaLoRAError, match=message):
        datasets.benign_prompts()


# --- the over-refusal sets (benign prompts that sound risky, dev and test) ----------------------


def overrefusal_rows(split: str) -> list[dict]:
    path = files("salora") / "resources" / "data" / datasets.overrefusal_file(split)
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_overrefusal_sets_format_and_balance():
    dev, test = datasets.overrefusal_prompts("dev"), datasets.overrefusal_prompts("test")
    assert len(dev) + len(test) >= 150 and len(dev) > len(test) >= 60
    for split, items in (("dev", dev), ("test", test)):
        rows = overrefusal_rows(split)
        assert [tuple(r) for r in rows] == [("id", "category", "prompt")] * len(rows)  # one field order throughout
        assert [i.id for i in items] == [f"or-{split}-{n:03d}" for n in range(1, len(items) + 1)]
        counts = Counter(i.category for i in items)
        assert set(counts) == set(datasets.OVERREFUSAL_CATEGORIES)  # every category in both splits
        assert max(counts.values()) - min(counts.values()) <= 1
        assert all(i.prompt == i.prompt.strip() and i.prompt[-1] in "?.!" for i in items)
    # `salora eval --prompts` reads the shipped file as is
    path = files("salora") / "resources" / "data" / datasets.overrefusal_file("test")
    assert [m[0]["content"] for m in read_chat_jsonl(path, need_assistant=False)] == [i.prompt for i in test]


def alignment_dev_benign() -> list[str]:
    """`DEV_BENIGN` of the alignment study, read from its source (tests do not import the benchmarks)."""
    tree = ast.parse((Path(__file__).parents[1] / "benchmarks" / "alignment.py").read_text(encoding="utf-8"))
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEV_BENIGN"]
    return list(ast.literal_eval(value))


def test_overrefusal_sets_overlap_nothing():
    """No prompt in both splits, and none equal or near-equal (Jaccard of words >= 0.7) to a prompt
    of the existing sets: the benign and harmful files and the alignment study's dev prompts."""
    words = lambda text: set(re.findall(r"[a-z']+", norm(text)))  # noqa: E731
    dev = [i.prompt for i in datasets.overrefusal_prompts("dev")]
    test = [i.prompt for i in datasets.overrefusal_prompts("test")]
    existing = ([b.prompt for b in datasets.benign_prompts()] + [h.prompt for h in datasets.harmful_prompts()]
                + alignment_dev_benign())
    pairs = [(a, b) for a in dev for b in test] + [(a, b) for a in dev + test for b in existing]
    near = [(a, b) for a, b in pairs if len(words(a) & words(b)) / len(words(a) | words(b)) >= 0.7]
    assert not near
    assert len({norm(p) for p in dev + test}) == len(dev) + len(test)


def test_overrefusal_loader_refuses_bad_files(fake_data):
    datasets.overrefusal_prompts.cache_clear()
    try:
        fake_data["overrefusal_dev.jsonl"] = b'{"id": "x", "category": "knitting", "prompt": "Is this fine?"}\n'
        with pytest.raises(SaLoRAError, match="overrefusal_dev.jsonl:1: unknown category"):
            datasets.overrefusal_prompts("dev")
        fake_data["overrefusal_dev.jsonl"] = b'{"id": "x", "prompt": "Is this fine?"}\n'
        with pytest.raises(SaLoRAError, match="expected exactly"):
            datasets.overrefusal_prompts("dev")
        with pytest.raises(SaLoRAError, match="unknown over-refusal split"):
            datasets.overrefusal_prompts("train")
    finally:
        datasets.overrefusal_prompts.cache_clear()
