"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated
momentum. One moment per weight (half of AdamW's state), no step count, no epsilon.

    c = beta1 * m + (1 - beta1) * g;   w <- w * (1 - lr * weight_decay) - lr * sign(c)
    m <- beta2 * m + (1 - beta2) * g
Its updates all have size lr, so it wants a learning rate 3-10x below AdamW's; --adam-betas sets
its betas too (as transformers' Trainer passes adam_beta1/2 to Lion); the paper's are 0.9,0.99.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.optim.base import Optimizer
from slowllama.optim.rounding import round_with_key


def lion_fused(w, g, coef, scalars, state, noise):
    """Lion's update of one weight and its moment. scalars: (1 - lr * weight_decay, 1 - beta1, 1 - beta2, lr)."""
    (m,) = state
    decay, one_minus_b1, one_minus_b2, lr = scalars.unbind()
    g32 = g.float() * coef
    m32 = m.float()
    w32 = w.float() * decay - lr * m32.lerp(g32, one_minus_b1).sign()
    return round_with_key(w32, w.dtype, noise), (m32.lerp(g32, one_minus_b2).to(m.dtype),)


@dataclass
class Lion(Optimizer):
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    state_dtype: torch.dtype = torch.float32
    name = "lion"
    summary = ("Lion, the sign of an interpolated momentum (half of AdamW's state; it wants a 3-10x lower "
               "--lr)")
    state_names = ("exp_avg",)

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise SlowllamaError(f"--adam-betas: each beta must be in [0, 1), got {b1},{b2}")
        if not self.weight_decay >= 0:
            raise SlowllamaError(f"--weight-decay: must be >= 0, got {self.weight_decay}")

    def scalars(self, lr: float, number: Optional[float]) -> list[float]:
        b1, b2 = self.betas
        return [1 - lr * self.weight_decay, 1 - b1, 1 - b2, lr]

    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
               lr: float, number: Optional[float] = None) -> None:
        b1, b2 = self.betas
        for k, p in params.items():
            g, exp_avg = grads[k], state[f"{k}.exp_avg"]
            m = exp_avg.float() if exp_avg.dtype != torch.float32 else exp_avg
            p.mul_(1 - lr * self.weight_decay)
            p.add_(m.lerp(g, 1 - b1).sign_(), alpha=-lr)
            m.lerp_(g, 1 - b2)
            if m is not exp_avg:
                exp_avg.copy_(m)

    fused = staticmethod(lion_fused)
