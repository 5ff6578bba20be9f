"""The shipped prompt sets: enough of each kind, balanced splits, no leaks between splits or
between harmful and benign, refusals the keyword judge recognises, and validation on load."""

from __future__ import annotations

import json
import re
from collections import Counter

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
