"""Modules on several ranks (torchrun): rank 0 streams them from the store and sends them to the others.

Inside a training step every rank asks for the same modules at the same points, in the same order
(each ask is a collective): rank 0 reads a module and broadcasts it, the others receive it into
fresh tensors. When the whole model fits a rank's device budget, the other ranks keep their copy
of every module (replicas), and rank 0 sends each module once, then again after each update.
A module's gradient is summed onto rank 0, which alone applies the optimizer and writes it.
Outside a step (eval, generation on rank 0 alone) modules come from the store as on one rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from slowllama.engine.fleet import Fleet
from slowllama.engine.pipeline import Pipeline
from slowllama.engine.step import Step


class Replicas:
    def __init__(self, fleet: Fleet, pipe: Pipeline, dtype: torch.dtype, shapes: dict[str, dict[str, tuple]],
                 device: torch.device):
        self.fleet, self.pipe, self.dtype, self.shapes, self.device = fleet, pipe, dtype, shapes, device
        self.replicate = False  # ranks > 0 keep every module they get (the model fits their device budget)
        self.copies: dict[str, dict[str, torch.Tensor]] = {}  # ranks > 0: name -> tensors
        self.sent: set[str] = set()  # rank 0: modules the replicas hold in their current version
        self._in_step = False  # inside a training step: modules come from rank 0

    def choose(self, fits_on_device: bool) -> str:
        """Whether ranks > 0 keep a copy of every module, as rank 0 decides (a collective); the line saying so."""
        self.replicate = self.fleet.broadcast_object(fits_on_device)
        how = "keep a copy of every module" if self.replicate else "get each module as it is used"
        return f"{self.fleet.world} ranks: the others {how}"

    @contextmanager
    def step(self):
        """The modules asked for inside come from rank 0 on every rank."""
        self._in_step = self.fleet.active
        try:
            yield
        finally:
            self._in_step = False

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """A module's weights to compute with: from the store, or on ranks > 0 of a step, from rank 0."""
        fleet = self.fleet
        if not self._in_step:
            return self.pipe.get(("modules", name))
        if fleet.main:
            tensors = self.pipe.get(("modules", name))
            if not (self.replicate and name in self.sent):
                fleet.broadcast(tensors)
                if self.replicate:
                    self.sent.add(name)
            return tensors
        if name in self.copies:
            return self.copies[name]
        tensors = {k: torch.empty(shape, dtype=self.dtype, device=self.device)
                   for k, shape in self.shapes[name].items()}
        fleet.broadcast(tensors)
        if self.replicate:
            self.copies[name] = tensors
        return tensors

    def reduce(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A module's gradient summed over ranks, on rank 0 (the others get their own back, unused)."""
        return self.fleet.reduce(grads)

    def updated(self, name: str, new: Optional[dict[str, torch.Tensor]], step: Step) -> None:
        """After rank 0 updated a module (new: its weights there), the replicas take the new version."""
        if self.fleet.active and self.replicate and step.update:
            self.fleet.broadcast(new if self.fleet.main else self.copies[name])
