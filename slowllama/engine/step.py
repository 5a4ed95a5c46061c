"""What one training step is to the engine: its values (a small frozen object handed down the chain, not kept
on the engine), what it tallies while its modules are done, and what it returns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from slowllama.errors import SlowllamaError


@dataclass(frozen=True)
class Step:
    number: int  # the step being made, 1-based in the run: it seeds dropout masks and stochastic rounding
    lr: float
    clip_coef: float = 1.0  # gradients are multiplied by this before the update
    update: bool = True  # False: exact clipping's norm pass, which measures the gradient and changes nothing
    max_grad_norm: float = 0.0  # LoRA: the adapters are clipped to it exactly, after the whole backward pass
    micro_offset: int = 0  # the step-wide index of this rank's first microbatch (dropout seeds)


@dataclass
class StepResult:
    loss: float  # mean token cross-entropy over all targets of the step
    targets: int  # number of targets that carry loss
    tokens: int  # number of input tokens
    grad_norm: float  # global L2 norm of the step's gradient, before clipping


class NonFiniteLoss(SlowllamaError):
    """A NaN or infinite loss or gradient. `untouched`: no weight had been updated yet in this step;
    `everywhere`: every rank found it at the same point (the loss, summed over ranks; not a gradient, which only
    its module's owner sees)."""

    def __init__(self, message: str, untouched: bool, everywhere: bool = False):
        super().__init__(message)
        self.untouched, self.everywhere = untouched, everywhere


@dataclass
class Tally:
    """What a step gathers as its modules are done: each gradient's norm, and whether a weight has changed
    (then resident copies may hold the step's updates).

    On a GPU, whether a module's gradient is finite is learnt one module late: its flag is copied to the host
    behind the module's backward, and read at the next module's record, by which time the GPU is on the next
    backward, so that no record waits for the GPU to drain. Until the step's first update that check is
    immediate: a non-finite gradient then stops the step with nothing touched. Later, the module found
    non-finite may have been updated, which the step's roll-back undoes like any other of its updates."""

    number: int
    norms: list[torch.Tensor] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # where each norm was recorded (several ranks merge them)
    touched: bool = False
    _pending: Optional[tuple] = None  # (flag on the host, its copy's event, where, keys, norms): not yet checked

    def record(self, where: str, grads: dict[str, torch.Tensor]) -> None:
        """Record each gradient's norm; a non-finite one stops the step before it is committed.

        The global norm is then the norm of all per-tensor norms, as clip_grad_norm_ computes it.
        """
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads.values()])
        self.norms.append(norms)
        self.labels.extend([where] * len(grads))
        finite = torch.isfinite(norms).all()
        self.check()
        if norms.device.type != "cuda" or not self.touched:
            self._raise_unless(finite.item(), where, list(grads), norms)  # one device sync
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (flag, event, where, list(grads), norms)

    def check(self) -> None:
        """Raise for the module recorded last if its gradient was not finite (waits for that module alone)."""
        if self._pending is None:
            return
        flag, event, where, keys, norms = self._pending
        self._pending = None
        event.synchronize()
        self._raise_unless(bool(flag), where, keys, norms)

    def _raise_unless(self, finite: bool, where: str, keys: list[str], norms: torch.Tensor) -> None:
        if finite:
            return
        bad = keys[int((~torch.isfinite(norms)).nonzero()[0])]
        raise NonFiniteLoss(f"step {self.number}: non-finite gradient in {where}{bad}; nothing of this step "
                            "was committed (try a lower --lr)", untouched=not self.touched)

    def grad_norm(self) -> float:
        """The global norm of every gradient recorded (after checking the last one)."""
        self.check()
        return torch.linalg.vector_norm(torch.cat(self.norms)).item() if self.norms else 0.0


def module_seed(run_seed: int, step: int, micro: int, module_index: int) -> int:
    """The RNG seed for one module in one microbatch of one step (dropout masks; micro -1: rounding bits)."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{micro}/{module_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
