"""AdamW, torch.optim.AdamW's arithmetic, with its state kept in the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.errors import SlowllamaError


@dataclass
class AdamW:
    """torch.optim.AdamW's update (amsgrad off), state exp_avg, exp_avg_sq and step per weight."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_dtype: torch.dtype = torch.float32
    name = "adamw"
    stateful = True

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise SlowllamaError(f"--adam-betas: each beta must be in [0, 1), got {b1},{b2}")
        if not self.eps > 0:
            raise SlowllamaError(f"--adam-eps: must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise SlowllamaError(f"--weight-decay: must be >= 0, got {self.weight_decay}")

    def init_state(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(iter(params.values())).device
        state = {"step": torch.zeros((), dtype=torch.float32, device=device)}  # updates so far (all weights of a module)
        for k, p in params.items():
            state[f"{k}.exp_avg"] = torch.zeros(p.shape, dtype=self.state_dtype, device=p.device)
            state[f"{k}.exp_avg_sq"] = torch.zeros(p.shape, dtype=self.state_dtype, device=p.device)
        return state

    def fused_scalars(self, step: float, lr: float, device) -> torch.Tensor:
        """The scalars of update number `step` as compiled.py's fused AdamW takes them."""
        b1, b2 = self.betas
        return torch.tensor([1 - lr * self.weight_decay, 1 - b1, b2, 1 - b2, (1 - b2 ** step) ** 0.5, self.eps,
                             lr / (1 - b1 ** step)], dtype=torch.float32, device=device)

    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
               state: dict[str, torch.Tensor], lr: float, step: Optional[float] = None) -> None:
        """step: the number of this update, where the caller knows it (state["step"] + 1: no device sync)."""
        b1, b2 = self.betas
        state["step"] += 1
        step = state["step"].item() if step is None else step
        bias_correction1 = 1 - b1 ** step
        bias_correction2 = 1 - b2 ** step
        step_size = lr / bias_correction1
        for k, p in params.items():
            g = grads[k]
            exp_avg, exp_avg_sq = state[f"{k}.exp_avg"], state[f"{k}.exp_avg_sq"]
            # fp32 arithmetic whatever the state's dtype (the state is rounded back below)
            m = exp_avg.float() if exp_avg.dtype != torch.float32 else exp_avg
            v = exp_avg_sq.float() if exp_avg_sq.dtype != torch.float32 else exp_avg_sq
            p.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)
            if m is not exp_avg:
                exp_avg.copy_(m)
                exp_avg_sq.copy_(v)
