"""SGD without momentum or weight decay: no state."""

from __future__ import annotations

from typing import Optional

import torch



class SGD:
    """torch.optim.SGD(lr) with no momentum and no weight decay: w <- w - lr * g."""

    name = "sgd"
    stateful = False

    def init_state(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
               state: dict[str, torch.Tensor], lr: float, step: Optional[float] = None) -> None:
        for k, p in params.items():
            p.add_(grads[k], alpha=-lr)
