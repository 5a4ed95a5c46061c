"""AdamW with torch.optim.AdamW's arithmetic (amsgrad off): two moments and a step count per weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.optim.base import Optimizer
from slowllama.optim.rounding import round_with_key


def adamw_fused(w, g, coef, scalars, state, noise):
    """AdamW's update of one weight and its moments: (weight, (exp_avg, exp_avg_sq)) in their dtypes.
    scalars: (1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, sqrt(bias_correction2), eps, step_size)."""
    m, v = state
    decay, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step_size = scalars.unbind()
    g32 = g.float() * coef
    m32 = m.float().lerp(g32, one_minus_b1)
    v32 = v.float() * b2 + one_minus_b2 * g32 * g32
    w32 = w.float() * decay - step_size * (m32 / (v32.sqrt() / bc2_sqrt + eps))
    return round_with_key(w32, w.dtype, noise), (m32.to(m.dtype), v32.to(v.dtype))


@dataclass
class AdamW(Optimizer):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_dtype: torch.dtype = torch.float32
    name = "adamw"
    summary = "torch.optim.AdamW"
    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise SlowllamaError(f"--adam-betas: each beta must be in [0, 1), got {b1},{b2}")
        if not self.eps > 0:
            raise SlowllamaError(f"--adam-eps: must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise SlowllamaError(f"--weight-decay: must be >= 0, got {self.weight_decay}")

    def scalars(self, lr: float, number: Optional[float]) -> list[float]:
        b1, b2 = self.betas
        return [1 - lr * self.weight_decay, 1 - b1, b2, 1 - b2, (1 - b2 ** number) ** 0.5, self.eps,
                lr / (1 - b1 ** number)]

    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
               lr: float, number: Optional[float] = None) -> None:
        b1, b2 = self.betas
        state["step"] += 1
        number = state["step"].item() if number is None else number
        bias_correction1 = 1 - b1 ** number
        bias_correction2 = 1 - b2 ** number
        step_size = lr / bias_correction1
        # every weight at once (multi-tensor ops: a handful of kernels for many small weights, as LoRA's), in
        # the order of operations of torch.optim.AdamW; fp32 arithmetic whatever the state's dtype
        keys = list(params)
        ps, gs = [params[k] for k in keys], [grads[k] for k in keys]
        ms, vs = [state[f"{k}.exp_avg"] for k in keys], [state[f"{k}.exp_avg_sq"] for k in keys]
        m32, v32 = [m.float() for m in ms], [v.float() for v in vs]  # the state itself where it is fp32
        torch._foreach_mul_(ps, 1 - lr * self.weight_decay)
        torch._foreach_lerp_(m32, gs, 1 - b1)
        torch._foreach_mul_(v32, b2)
        torch._foreach_addcmul_(v32, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, bias_correction2 ** 0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, m32, denom, value=-step_size)
        for m, v, m_, v_ in zip(ms, vs, m32, v32):
            if m_ is not m:  # rounded back to the state's dtype
                m.copy_(m_)
                v.copy_(v_)

    fused = staticmethod(adamw_fused)
