"""Recipes as data: the values each preset gives the method's options of `calibrate` and `train`.

One definition serves the command line (`--preset paper`) and the benchmarks
(`benchmarks/safety.py`). A flag given explicitly that contradicts the preset is an error naming
both; a flag that agrees with it, or one the preset does not set, is kept.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from salora.errors import SaLoRAError
from salora.tuner.config import ALL_LINEAR, PAPER_TARGETS

# The defaults of the method's options when no preset is given: the input guard on all seven linear
# projections from a standard LoRA start (the winner of docs/safety-study.md).
DEFAULTS = MappingProxyType({
    "calibrate": MappingProxyType({
        "target_modules": tuple(ALL_LINEAR), "rank_safety": 32, "energy": None, "contrast_data": None, "max_samples": 128,
        "input_energy": 0.9,
    }),
    "train": MappingProxyType({"init": "zero", "task_rank": 32, "alpha": None, "projection": "input"}),
})

# The paper (arXiv 2501.01765): q/v, a top-variance V_s with r_s = 32 from 128 conversations and no
# input guard; task-aware init with d_s = 32, alpha = r (None) and the output projection C.
PRESETS = MappingProxyType({
    "paper": MappingProxyType({
        "calibrate": MappingProxyType({
            "target_modules": tuple(PAPER_TARGETS), "rank_safety": 32, "energy": None, "contrast_data": None, "max_samples": 128,
            "input_energy": None,
        }),
        "train": MappingProxyType({"init": "task", "task_rank": 32, "alpha": None, "projection": "output"}),
    }),
})


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(value: Any, key: str = "") -> str:
    if value is None:
        return "equal to --rank" if key == "alpha" else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _agrees(key: str, given: Any, preset: Any, context: dict[str, Any]) -> bool:
    if key == "target_modules":
        return sorted(given) == sorted(preset)
    if key == "alpha" and preset is None:  # the preset's alpha is the rank (scale 1)
        return context.get("rank") is not None and float(given) == float(context["rank"])
    return given == preset


def resolve(command: str, preset: str | None, given: dict[str, Any], context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's options of `command` ("calibrate" or "train"): each explicit value (not None in
    `given`) if the preset agrees with it, else the preset's value, else the default. `context`
    holds other options a comparison needs (the rank, for alpha)."""
    if preset is not None and preset not in PRESETS:
        raise SaLoRAError(f"--preset {preset}: unknown (known: {', '.join(PRESETS)})")
    values = dict(PRESETS[preset][command]) if preset else {}
    for key, value in given.items():
        if value is None:
            continue
        if key in values:
            if not _agrees(key, value, values[key], context or {}):
                raise SaLoRAError(
                    f"{flag(key)} {_show(value)} contradicts --preset {preset}, which sets {flag(key)} {_show(values[key], key)}; "
                    f"drop one of them"
                )
            continue  # agrees: the preset's own form is recorded (alpha None, the canonical module order)
        values[key] = value
    for key, default in DEFAULTS[command].items():
        values.setdefault(key, default)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
