"""What a SaLoRA adapter is: rank, scale, targets and how it starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

DEFAULT_TARGETS = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Init = Literal["task", "task-scaled", "zero"]


@dataclass
class SaLoRAConfig:
    """Hyper-parameters of a SaLoRA adapter (paper defaults: r_s = d_s = 32, alpha = r).

    init: `task` is the paper's task-aware start (B0 = V_t V_t^T U sqrt(S), A0 = sqrt(S) V^T,
    base weight replaced by the residual so step 0 equals the base); `task-scaled` keeps those
    directions but rescales both factors to the norm of a standard LoRA A, so the adapter trains
    at LoRA's effective learning rate (the paper's sqrt(S) factors make it train much harder);
    `zero` is standard LoRA (Kaiming A, zero B), for which the residual is the base itself.
    project: apply the safety projection C = I - V_s V_s^T to every update (off only for ablations).
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    init: Init = "task"
    task_rank: int = 32
    project: bool = True

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        return asdict(self)
