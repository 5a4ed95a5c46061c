"""What an optimizer is to the engine: the state it keeps per weight, and its update, eager and fused.

The engine updates one part of one weight at a time (store/state_parts.py: rows of a weight):
the rows in fp32, their gradient (already times the clip coefficient) and their slice of the
state. An optimizer declares its state, so that the store, the memory budgets and the compiled
path need not know which optimizer runs:
- `state_names`: tensors kept per weight, `<weight>.<name>`, in `state_dtype`, each the weight's shape;
- `counts_steps`: a scalar `step` per part, the number of updates so far (bias corrections).
Its update comes twice, beside each other in its file: `update`, eager and in place, in
torch.optim's order of operations; and `fused`, a pure function that torch.compile fuses into one
pass per weight, upcast and stochastic rounding included (engine/compiled.py).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch


class Optimizer:
    """The interface every optimizer implements (one file each in this folder; registry.py finds them)."""

    name: ClassVar[str]  # --optimizer NAME
    summary: ClassVar[str]  # what --help says of it
    state_names: ClassVar[tuple[str, ...]] = ()
    counts_steps: ClassVar[bool] = False
    state_dtype: torch.dtype = torch.float32

    @property
    def stateful(self) -> bool:
        """Whether it keeps state in the store (then read and written with every update)."""
        return bool(self.state_names) or self.counts_steps

    @property
    def state_bytes_per_weight(self) -> int:
        """Bytes of state stored per weight (the step counts are a few bytes per part, left out)."""
        return len(self.state_names) * self.state_dtype.itemsize

    def state_keys(self, weight: str) -> set[str]:
        """The names of a weight's state tensors in a state file."""
        return {f"{weight}.{n}" for n in self.state_names} | ({"step"} if self.counts_steps else set())

    def init_state(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fresh state for some weights: zeros of each weight's shape, and a step count of 0."""
        state = {}
        if self.counts_steps:
            state["step"] = torch.zeros((), dtype=torch.float32, device=next(iter(params.values())).device)
        for key, p in params.items():
            for n in self.state_names:
                state[f"{key}.{n}"] = torch.zeros(p.shape, dtype=self.state_dtype, device=p.device)
        return state

    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
               lr: float, number: Optional[float] = None) -> None:
        """One update, eager and in place: fp32 `params` and `state` from fp32 `grads`.

        number: the number of this update where the caller knows it (state["step"] + 1, without a device sync).
        """
        raise NotImplementedError

    def scalars(self, lr: float, number: Optional[float]) -> list[float]:
        """The per-update constants `fused` takes (the caller puts them on the device, once per module)."""
        raise NotImplementedError

    # fused(w, g, coef, scalars, state, noise) -> (new weight in w's dtype, new state tensors in their dtypes):
    # w the stored weight's rows, g their gradient, coef the clip coefficient (a device scalar), scalars
    # scalars(lr, number) on the device, state the state tensors in the order of state_names, noise the key of
    # stochastic rounding's hashed bits for a bf16 weight (optim/rounding.py: round_with_key; None: round to
    # nearest). A staticmethod: torch.compile takes it as it is.
    fused: ClassVar[Callable[..., tuple]]
