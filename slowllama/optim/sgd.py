"""SGD without momentum or weight decay (torch.optim.SGD(lr)): w <- w - lr * g, no state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.optim.base import Optimizer
from slowllama.optim.rounding import round_with_key


def sgd_fused(w, g, coef, scalars, state, noise):
    """SGD's update of one 16- or 32-bit weight, from its gradient times the clip coefficient."""
    lr = scalars[0]
    return round_with_key(w.float() - lr * (g.float() * coef), w.dtype, noise), ()


@dataclass
class SGD(Optimizer):
    name = "sgd"
    summary = "torch.optim.SGD without momentum"

    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
               lr: float, number: Optional[float] = None) -> None:
        for k, p in params.items():
            p.add_(grads[k], alpha=-lr)

    def scalars(self, lr: float, number: Optional[float]) -> list[float]:
        return [lr]

    fused = staticmethod(sgd_fused)
