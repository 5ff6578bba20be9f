"""What a SaLoRA adapter is: rank, scale, targets and how it starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_TARGETS = ["q_proj", "v_proj"]
Init = Literal["task", "task-scaled", "zero"]
Projection = Literal["output", "input", "both", "none"]


@dataclass
class SaLoRAConfig:
    """Hyper-parameters of a SaLoRA adapter. The defaults are the configuration that won this
    project's safety study (docs/safety-study.md): all seven linear projections, standard LoRA start,
    input-side guard. The paper's is PAPER_TARGETS, `init="task"`, `task_rank=32`, `projection="output"`
    (alpha = r, r_s = 32 at calibration).

    init: `task` is the paper's task-aware start (B0 = V_t V_t^T U sqrt(S), A0 = sqrt(S) V^T,
    base weight replaced by the residual so step 0 equals the base); `task-scaled` keeps those
    directions but rescales both factors to the norm of a standard LoRA A, so the adapter trains
    at LoRA's effective learning rate (the paper's sqrt(S) factors make it train much harder);
    `zero` is standard LoRA (Kaiming A, zero B), for which the residual is the base itself.
    projection: `output` applies the paper's C = I - V_s V_s^T to every update; `input` applies this
    project's input-side guard P = I - U U^T instead, `both` applies the two, `none` neither (ablation).
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    init: Init = "zero"
    task_rank: int = 32
    projection: Projection = "input"

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        return asdict(self)
