"""Optimizer updates of one module at a time, with per-module state kept in the store.

Each update takes the module's weights in fp32 (the master copy, or the stored 16-bit weights
upcast), its accumulated gradients and its state, and updates weights and state in place with
exactly the arithmetic of torch.optim (SGD without momentum, AdamW). The caller rounds the result
back to the store's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.errors import SlowllamaError


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


def round_to(w32: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 -> dtype; with a generator, stochastic rounding (unbiased: E[result] = w32) for bf16."""
    bits = rounding_bits(w32, generator) if generator is not None and dtype == torch.bfloat16 else None
    return round_with_bits(w32, dtype, bits)


def rounding_bits(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The random low halves that stochastic rounding of w adds, drawn from generator (int32, w's shape)."""
    return torch.randint(0, 1 << 16, w.shape, dtype=torch.int32, device=w.device, generator=generator)


def round_with_bits(w32: torch.Tensor, dtype: torch.dtype, bits: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 -> dtype, with stochastic rounding to bf16 when given its random bits (else round to nearest).

    bf16 is the top half of an fp32: adding uniform random bits to the 16 bits that are dropped,
    then truncating, rounds up with probability equal to the dropped fraction. No generator in here,
    so torch.compile can fuse it into an update (compiled.py).
    """
    if dtype == torch.float32:
        return w32
    if bits is None or dtype != torch.bfloat16:
        return w32.to(dtype)
    rounded = (w32.contiguous().view(torch.int32) + bits) & -65536  # clear the low 16 bits
    out = rounded.view(torch.float32).to(torch.bfloat16)
    # inf/nan and values that would overflow keep round-to-nearest (no .any(): that would sync a GPU)
    return torch.where(torch.isfinite(rounded.view(torch.float32)), out, w32.to(torch.bfloat16))


SCHEDULES = ("constant", "cosine", "linear")


def lr_at(step: int, total: int, base: float, schedule: str = "constant", warmup: int = 0) -> float:
    """Learning rate of step `step` (1-based) of a run of `total` steps.

    Linear warmup from base/warmup to base over the first `warmup` steps, then constant, cosine
    decay to 0, or linear decay to 0 at step `total`.
    """
    if warmup and step <= warmup:
        return base * step / warmup
    if schedule == "constant":
        return base
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        import math

        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base * (1.0 - progress)
    raise SlowllamaError(f"--lr-schedule: unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1, in fp32 as it computes it."""
    coef = max_norm / (torch.tensor(norm, dtype=torch.float32) + 1e-6)
    return float(torch.clamp(coef, max=1.0))


def make_optimizer(s) -> "SGD | AdamW":
    """The optimizer of finetune's settings."""
    from slowllama.config import dtype_from_name

    if s.optimizer == "sgd":
        return SGD()
    try:
        b1, b2 = (float(x) for x in str(s.adam_betas).split(","))
    except ValueError:
        raise SlowllamaError(f"--adam-betas: expected two numbers like 0.9,0.999, got {s.adam_betas!r}") from None
    return AdamW(betas=(b1, b2), eps=s.adam_eps, weight_decay=s.weight_decay,
                 state_dtype=dtype_from_name(s.optim_dtype, "--optim-dtype"))
