"""The SaLoRA adapter, split as PEFT splits its tuners: config, layer (the math), model (injection)."""

from salora.tuner.config import SaLoRAConfig
from salora.tuner.layer import SaLoRALinear
from salora.tuner.model import inject_salora, load_salora, salora_layers

__all__ = ["SaLoRAConfig", "SaLoRALinear", "inject_salora", "load_salora", "salora_layers"]
