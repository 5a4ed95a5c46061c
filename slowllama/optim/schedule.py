"""Learning-rate schedules and the gradient-clipping coefficient: functions of numbers only."""

from __future__ import annotations

import math

import torch

from slowllama.errors import SlowllamaError

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
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base * (1.0 - progress)
    raise SlowllamaError(f"--lr-schedule: unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1, in fp32 as it computes it."""
    coef = max_norm / (torch.tensor(norm, dtype=torch.float32) + 1e-6)
    return float(torch.clamp(coef, max=1.0))
