"""The SaLoRA linear layer: y = x W_res^T + s x (A P)^T (C B)^T with C = I - V_s V_s^T.

C is never built (d_out^2): the effective up-projection C B = B - V_s (V_s^T B) costs
d_out * r * r_s once per forward, not per token, which keeps SaLoRA's step time at LoRA's.
P = I - U U^T is this project's optional input-side guard (not in the paper): with U spanning the
module's inputs on safety conversations, the update cannot react to them (dW x ~ 0 there), so the
model's computation on those conversations is left as it was. P is applied to A the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def project_out(V: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
    """C M = M - V (V^T M); identity when there is no safety basis."""
    return M if V is None else M - V @ (V.T @ M)


def project_rows(U: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
    """A P = A - (A U) U^T; identity when there is no input basis."""
    return A if U is None else A - (A @ U) @ U.T


def _basis(T: torch.Tensor | None) -> torch.Tensor | None:
    """Bases are stored as (d, 0) tensors when absent."""
    return T if T is not None and T.shape[1] else None


class SaLoRALinear(nn.Module):
    """Wraps a frozen nn.Linear whose weight already holds W_res.

    Buffers: `V` (d_out x r_s, orthonormal output-side safety basis) and `U` (d_in x r_u,
    input-side), each (d, 0) when unused; `A0`, `B0` (the initial factors, kept so export can
    express the delta against the unmodified base). Parameters: `A` (r x d_in), `B` (d_out x r).
    """

    def __init__(
        self, base: nn.Linear, A0: torch.Tensor, B0: torch.Tensor, V: torch.Tensor | None, scale: float, U: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.A = nn.Parameter(A0.clone())
        self.B = nn.Parameter(B0.clone())
        self.register_buffer("A0", A0.clone())
        self.register_buffer("B0", B0.clone())
        self.register_buffer("V", V if V is not None else torch.empty(base.out_features, 0))
        self.register_buffer("U", U if U is not None else torch.empty(base.in_features, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base in its own dtype (bfloat16 on a GPU); the adapter path in the factors' dtype
        (float32), its input cast up and its output cast back, as PEFT does with LoRA."""
        result = self.base(x)
        A = project_rows(_basis(self.U), self.A)
        delta = F.linear(F.linear(x.to(A.dtype), A), project_out(_basis(self.V), self.B))
        return result + (self.scale * delta).to(result.dtype)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return lora_factors(self.A, self.B, self.A0, self.B0, self.V, self.scale, self.U)


def lora_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    A0: torch.Tensor,
    B0: torch.Tensor,
    V: torch.Tensor | None,
    scale: float,
    U: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA factors with lora_B @ lora_A == W' - W = s C B A P - s C B0 A0 P exactly, so
    the adapter applies to the UNMODIFIED base: rank 2r `[s CB | -s CB0] [AP ; A0 P]`, or rank r
    (s CB, AP) when the adapter started from B0 = 0."""
    V, U = _basis(V), _basis(U)
    if not torch.any(B0):
        return project_rows(U, A).clone(), scale * project_out(V, B)
    lora_A = torch.cat([project_rows(U, A), project_rows(U, A0)], dim=0)
    lora_B = torch.cat([scale * project_out(V, B), -scale * project_out(V, B0)], dim=1)
    return lora_A, lora_B


def zero_init(d_out: int, d_in: int, rank: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA start: A ~ Kaiming-uniform(a=sqrt(5)) as in PEFT, B = 0 (float32, on the CPU)."""
    A = torch.empty(rank, d_in)
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform_ with a=sqrt(5) on a (rank, d_in) matrix
    A.uniform_(-bound, bound, generator=generator)
    return A, torch.zeros(d_out, rank)


def task_aware_init(W: torch.Tensor, V_task: torch.Tensor, rank: int, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper's start: W ~ U diag(S) V^T at rank r; B0 = V_t V_t^T U diag(sqrt S), A0 = diag(sqrt S) V^T.
    `scaled` divides both factors by ||A0|| / ||A_kaiming|| (A_kaiming's expected Frobenius norm is
    sqrt(r / 3)), keeping the directions at a standard LoRA's magnitude."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    sqrt_s = S[:rank].sqrt()
    B0 = V_task.double() @ (V_task.double().T @ (U[:, :rank] * sqrt_s))
    A0 = sqrt_s[:, None] * Vh[:rank]
    if scaled:
        factor = A0.norm() / math.sqrt(rank / 3)
        A0, B0 = A0 / factor, B0 / factor
    dtype = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype  # adapter factors stay float32
    return A0.to(dtype), B0.to(dtype)
