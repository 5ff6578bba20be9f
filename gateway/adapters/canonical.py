"""The canonical `adapter_config.json`: the only adapter config an engine ever loads.

An uploaded config is data from an untrusted tenant, and PEFT acts on far more of it than the weights:
an `init_lora_weights` of `pissa`, `olora`, `corda`, `eva` or `loftq` rewrites the *shared base
weights* while the adapter loads, `layer_replication` rebuilds the base's layers, a `target_modules`
string is a regular expression PEFT runs against every module name, `modules_to_save` swaps whole
base modules. So the upload is parsed into this allow-list (plain LoRA on the base's decoder-layer
linear layers, uniform rank and alpha, optional rsLoRA), anything else is refused naming the field
(422), and the gateway writes a fresh config of its own beside the weights. What is served is exactly
what every engine, PEFT and vLLM alike, computes the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.adapters.errors import AdapterRejected

PEFT_CONFIG = "adapter_config.json"
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")  # a module name or dotted path, never a pattern
MAX_ALPHA = 1e6
SAFE_INITS = (True, False, "gaussian")  # only the adapter's own A and B are drawn: the base is never touched
# Keys that say nothing about what the adapter computes at inference, dropped from the canonical file.
INFORMATIONAL = {"peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                 "lora_dropout"}
# Keys PEFT always writes, at values that act only together with an option refused here.
INERT_DEFAULTS: dict[str, Any] = {"megatron_core": "megatron.core", "qalora_group_size": int}


def _unset(value: object) -> bool:
    """A value PEFT treats as "not used": None, false, empty, or a mapping of such values."""
    if isinstance(value, dict):
        return all(_unset(v) for v in value.values())
    return value is None or value is False or value in ([], "")


def refused(field: str, message: str, code: str = "unsupported_adapter") -> AdapterRejected:
    return AdapterRejected(f"{PEFT_CONFIG}: {field}: {message}", code=code, status=422, param=field)


@dataclass(frozen=True)
class AdapterConfig:
    """What the gateway serves of an adapter's config."""

    r: int
    lora_alpha: int | float
    target_modules: tuple[str, ...]  # module names or dotted path suffixes, PEFT's list form
    use_rslora: bool = False

    @classmethod
    def parse(cls, config: object, max_rank: int) -> AdapterConfig:
        """The allow-listed reading of an uploaded config; AdapterRejected (422) names the first field
        that is not plain, servable LoRA."""
        if not isinstance(config, dict):
            raise AdapterRejected(f"{PEFT_CONFIG} must hold a JSON object", code="invalid_adapter", status=422)
        if config.get("peft_type") != "LORA":
            raise refused("peft_type", f"{config.get('peft_type')!r}: only LORA adapters are served")
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            raise refused("task_type", f"{config['task_type']!r}: only CAUSAL_LM adapters fit the served base")
        if config.get("init_lora_weights", True) not in SAFE_INITS:
            raise refused("init_lora_weights", f"{config['init_lora_weights']!r} initialises from (and rewrites) "
                          "the base weights; only true, false or \"gaussian\" are accepted")
        if config.get("bias", "none") != "none":
            raise refused("bias", "must be \"none\" (LoRA biases cannot share a batch with other adapters)")
        r = config.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise refused("r", "must be a positive integer", code="invalid_adapter")
        if r > max_rank:
            raise refused("r", f"rank {r} is larger than this engine's limit of {max_rank}", code="rank_too_large")
        alpha = config.get("lora_alpha", 8)
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not (0 < alpha <= MAX_ALPHA):
            raise refused("lora_alpha", f"must be a number in (0, {MAX_ALPHA:g}]", code="invalid_adapter")
        targets = config.get("target_modules")
        if isinstance(targets, str):
            raise refused("target_modules", "a pattern is not accepted (PEFT would run it as a regular expression "
                          "against every module name); list the module names, e.g. [\"q_proj\", \"v_proj\"]")
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) and MODULE_NAME.match(t)
                                                              for t in targets)):
            raise refused("target_modules", "must be a non-empty list of module names", code="invalid_adapter")
        rslora = config.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise refused("use_rslora", "must be true or false", code="invalid_adapter")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = config.get(key)
            if not _unset(pattern) and not (isinstance(pattern, dict) and set(pattern.values()) <= {r if key == "rank_pattern" else alpha}):
                raise refused(key, "per-module ranks and alphas are not served (every engine must compute the same "
                              "adapter); use one r and lora_alpha")
        checked = {"peft_type", "task_type", "init_lora_weights", "bias", "r", "lora_alpha", "target_modules",
                   "use_rslora", "rank_pattern", "alpha_pattern", *INFORMATIONAL}
        for key, value in sorted(config.items()):
            if key in checked or _unset(value):
                continue
            inert = INERT_DEFAULTS.get(key)
            if inert is int and isinstance(value, int) or inert is not None and value == inert:
                continue
            raise refused(key, f"is set ({_short(value)}); only plain LoRA is served")
        return cls(r, alpha, tuple(sorted(set(targets))), rslora)

    def to_json(self, base_model: str) -> dict[str, Any]:
        """The file the engines load: PEFT's fields for exactly this adapter, and nothing else."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.lora_alpha, "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True,
        }


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
