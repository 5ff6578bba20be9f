"""The SaLoRA adapter, split as PEFT splits its tuners: config, layer (the math), model (injection).
The config is plain data; the layer and the model (torch) are imported on first use, so reading the
config (the CLI's defaults, salora.presets) needs no torch."""

from __future__ import annotations

import importlib
from typing import Any

from salora.tuner.config import SaLoRAConfig

_LAZY = {"SaLoRALinear": "salora.tuner.layer", "inject_salora": "salora.tuner.model",
         "load_salora": "salora.tuner.model", "salora_layers": "salora.tuner.model"}
__all__ = ["SaLoRAConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
