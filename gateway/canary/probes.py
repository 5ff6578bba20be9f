"""The canary's probe prompts: a stratified, seeded sample of the project's held-back `canary` split,
so every category of harm and both kinds of benign prompt are probed on every run, and the same
settings always give the same probes (which the base model's cached answers rely on)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

from gateway.canary.config import CanaryConfig
from salora.datasets import DATA_VERSION, benign_prompts, harmful_prompts

ProbeSet = Literal["harmful", "benign"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Probe:
    id: str
    set: ProbeSet
    category: str  # the harm category, or the benign kind (`ordinary`, `sounds_risky`)
    prompt: str


def _stratified(items: Iterable[T], key: Callable[[T], str], per_group: int | None, rng: random.Random) -> list[T]:
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    chosen: list[T] = []
    for name in sorted(groups):
        group = groups[name]
        chosen += group if per_group is None or per_group >= len(group) else rng.sample(group, per_group)
    return chosen


def select_probes(config: CanaryConfig) -> list[Probe]:
    """Harmful probes first, then benign ones, each group in a fixed order."""
    rng = random.Random(config.seed)
    harmful = _stratified(harmful_prompts("canary"), lambda h: h.category, config.harmful_per_category, rng)
    benign = _stratified(benign_prompts("canary"), lambda b: b.kind, config.benign_per_kind, rng)
    return ([Probe(h.id, "harmful", h.category, h.prompt) for h in harmful]
            + [Probe(b.id, "benign", b.kind, b.prompt) for b in benign])


def probe_set_key(probes: list[Probe], max_new_tokens: int) -> dict[str, object]:
    """What a probe answer depends on besides the model: the data version, the prompts, the length."""
    digest = hashlib.sha256(json.dumps([p.id for p in probes]).encode()).hexdigest()[:16]
    return {"data_version": DATA_VERSION, "probes": digest, "n": len(probes), "max_new_tokens": max_new_tokens}
