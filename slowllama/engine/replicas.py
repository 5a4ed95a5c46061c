"""Modules on several ranks (torchrun): each module has one owner rank, which alone streams it from the store.

Every module (tok_embeddings, each block, head) belongs to one rank (owners.py, balanced by bytes). Its
owner alone reads it (its pipeline's plan holds only its own modules' reads and writes, read ahead as on
one rank), keeps its optimizer state, applies its update and writes its files. Inside a training step
every rank asks for the same modules in the same order (residency.step_uses; each ask is a collective):
the owner broadcasts the module from itself, the others receive it into fresh tensors. A module's
gradient is reduced onto its owner. When the whole model fits a rank's device budget, every rank keeps a
copy of each module it does not own: the owner sends each module once, then again after each update.

The collectives overlap the compute (async work handles: gloo's threads, NCCL's own stream): the
broadcast of the module asked for next starts when the one before it is asked for, and a module's
gradient reduce runs while the next module's backward computes, its owner updating it only after that
(the owner's plan of use puts the update there: residency.train_plan's deferred_updates). Updated
weights go to the copies in the background, waited for at the end of the step.

The store's commit (rank 0, once every rank's files are durable): train/checkpoints.py. Outside a step
(eval, generation on rank 0 alone) modules come from rank 0's pipeline, or for modules another rank owns,
from the copy kept here or from the store (which then holds every step: a model that stays resident
between commits is one that fits the device, and so is copied).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch

from slowllama.engine.activations import nbytes
from slowllama.engine.fleet import Fleet
from slowllama.engine.owners import assign_owners
from slowllama.engine.pipeline import Key, Pipeline
from slowllama.engine.step import Step, Tally
from slowllama.store.state_parts import part_module, split_piece


class Replicas:
    def __init__(self, fleet: Fleet, pipe: Pipeline, specs: dict[str, dict[str, tuple[torch.dtype, tuple]]],
                 device: torch.device, sizes: list[tuple[str, int]]):
        """specs: {module: {key: (dtype, shape)}} as the store keeps them (a quantized weight: its packed bytes), what
        the other ranks receive; sizes: (module, bytes) in forward order, for the owners' table."""
        self.fleet, self.pipe, self.specs, self.device = fleet, pipe, specs, device
        self.names = [name for name, _ in sizes]
        self.owners = fleet.owners or assign_owners(sizes, fleet.world if fleet.shared_store else 1)
        self.replicate = False  # every rank keeps a copy of the modules it does not own (the model fits the device)
        self.copies: dict[str, dict[str, torch.Tensor]] = {}  # modules other ranks own: name -> tensors
        self.copies_bytes = 0  # held against the pipeline's device budget
        self.sent: set[str] = set()  # own modules the other ranks hold in their current version
        self._in_step = False  # inside a training step: modules come from their owners
        self._uses: list[str] = []  # the modules the step asks for, in order (residency.step_uses)
        self._cursor = 0  # ... and how many it has asked for
        self._ahead: dict[str, tuple[dict[str, torch.Tensor], Optional[Callable[[], None]]]] = {}  # broadcasts begun
        self._pending: Optional[tuple] = None  # the last module's update, waiting for its gradient's reduce
        self._sending: list[Callable[[], None]] = []  # broadcasts of updated modules in flight

    # ---- ownership --------------------------------------------------------------------------
    def owner(self, name: str) -> int:
        """The rank that owns a module, a piece of it, or a part of its optimizer state."""
        return self.owners[part_module(split_piece(name)[0])]

    def mine(self, name: str) -> bool:
        return not self.fleet.active or self.owner(name) == self.fleet.rank

    def plan(self, keys: list[Key]) -> list[Key]:
        """This rank's part of a step's plan of use: the reads and writes of the modules it owns."""
        return [key for key in keys if self.mine(key[1])]

    def outside(self, keys: list[Key]) -> list[Key]:
        """A plan of use outside a step (eval on rank 0): without the modules whose copies are kept here."""
        return [key for key in keys if self.mine(key[1]) or part_module(split_piece(key[1])[0]) not in self.copies]

    def choose(self, fits_on_device: bool) -> str:
        """Whether every rank keeps a copy of the modules it does not own, as rank 0 decides (a collective); the
        line saying so."""
        self.replicate = self.fleet.broadcast_object(fits_on_device)
        how = "keeps a copy of" if self.replicate else "gets, as they are used,"
        return (f"{self.fleet.world} ranks, each owning a share of the modules (it reads, updates and writes them); "
                f"every rank {how} the others' modules")

    @property
    def update_lag(self) -> int:
        """Where a module's update comes in its owner's plan of use (train_plan's deferred_updates): after the next
        updated module and the one asked for ahead of it; 0 on one rank (at once)."""
        return 2 if self.fleet.active else 0

    @contextmanager
    def step(self, uses: list[str]):
        """The modules asked for inside come from their owners on every rank; uses: the modules the step asks for,
        in order (each is broadcast while the one before it computes)."""
        self._in_step = self.fleet.active
        self._uses, self._cursor = uses, 0
        if self._in_step:
            for key in [k for k in [*self.pipe.entries, *self.pipe.loading] if not self.mine(k[1])]:
                self.pipe.forget(key)  # read outside a step (eval on rank 0): another rank updates it
        try:
            yield
        finally:
            self._in_step, self._pending, self._sending, self._ahead = False, None, [], {}

    # ---- weights and gradients ---------------------------------------------------------------
    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """A module's weights to compute with: inside a step its owner's (read there, broadcast from there).

        The broadcast of the module the step asks for next starts here, in the background (its owner asks its
        pipeline for it now), and is waited for when it is asked for."""
        if not self._in_step:
            if self.fleet.active and not self.mine(name) and name in self.copies:
                return self.copies[name]
            return self.pipe.get(("modules", name))
        follows = None
        if self._cursor < len(self._uses) and self._uses[self._cursor] == name:
            self._cursor += 1
            follows = self._uses[self._cursor] if self._cursor < len(self._uses) else None
        tensors, wait = self._ahead.pop(name, None) or self._send(name)
        if follows is not None and follows not in self._ahead:
            self._ahead[follows] = self._send(follows)
        if wait is not None:
            wait()
        return tensors

    def _send(self, name: str) -> tuple[dict[str, torch.Tensor], Optional[Callable[[], None]]]:
        """Start a module's broadcast from its owner: (its tensors, the wait for them; None: nothing to wait for)."""
        owner = self.owner(name)
        if owner == self.fleet.rank:
            tensors = self.pipe.get(("modules", name))
            if self.replicate and name in self.sent:
                return tensors, None
            if self.replicate:
                self.sent.add(name)
            return tensors, self.fleet.broadcast_async(tensors, src=owner)
        if name in self.copies:
            return self.copies[name], None
        tensors = {k: torch.empty(shape, dtype=dtype, device=self.device) for k, (dtype, shape) in self.specs[name].items()}
        wait = self.fleet.broadcast_async(tensors, src=owner)
        if self.replicate:  # (asked for in this step only through _ahead, which waits first)
            self.copies[name] = tensors
            size = sum(nbytes(t) for t in tensors.values())
            self.copies_bytes += size
            self.pipe.device_budget.take(size)  # the pipeline keeps fewer of its own modules resident
        return tensors, wait

    def reduce(self, name: str, grads: dict[str, torch.Tensor], step: Step,
               update: Callable[[dict[str, torch.Tensor]], Optional[dict[str, torch.Tensor]]]) -> None:
        """A module's backward is done: its gradient summed over ranks onto its owner, which runs update(summed)
        (returning the new weights, or None) and the copies take the new version.

        One rank: at once. Several: the reduce starts in the background and this module's update waits until
        the next module's gradient is here too, so that the reduce runs while that module's backward computes
        (the owner's plan of use has the update there: train_plan's deferred_updates); the updated weights go to
        the copies in the background as well, waited for at the end of the step (finish)."""
        if not self.fleet.active:
            update(grads)
            return
        wait = self.fleet.reduce_async(grads, dst=self.owner(name))
        self._update_pending()
        self._pending = (name, wait, update, step)

    def _update_pending(self) -> None:
        if self._pending is None:
            return
        (name, wait, update, step), self._pending = self._pending, None
        summed = wait()
        new = update(summed) if self.mine(name) else None
        if self.replicate and step.update:
            self._sending.append(self.fleet.broadcast_async(new if self.mine(name) else self.copies[name],
                                                            src=self.owner(name)))

    def union(self, ids: torch.Tensor) -> torch.Tensor:
        """The sorted union over ranks of some sorted unique ids (the embedding rows a step uses; a collective)."""
        if not self.fleet.active:
            return ids
        everyone = self.fleet.gather_objects(ids.tolist())
        return torch.unique(torch.tensor([i for part in everyone for i in part], dtype=ids.dtype)).to(ids.device)

    def finish(self, tally: Tally) -> float:
        """The end of a step's backward: the last module's update made, every copy current; returns the step's
        global gradient norm, from every rank's tally of its own modules, taken in the order of the
        single-process backward pass (head down to the embeddings), so that it is the single process's norm."""
        if not self.fleet.active:
            return tally.grad_norm()
        self._update_pending()
        for wait in self._sending:
            wait()
        self._sending = []
        tally.check()
        mine = list(zip(tally.labels, torch.cat(tally.norms).tolist() if tally.norms else []))
        order = {f"{name}.": i for i, name in enumerate(reversed(self.names))}
        merged = sorted((x for part in self.fleet.gather_objects(mine) for x in part), key=lambda x: order[x[0]])
        if not merged:
            return 0.0
        return torch.linalg.vector_norm(torch.tensor([v for _, v in merged], dtype=torch.float32)).item()

    def discard(self) -> None:
        """After a failed step: the copies may hold its updates."""
        self.copies.clear()
        self.sent.clear()
        self.pipe.device_budget.give(self.copies_bytes)
        self.copies_bytes = 0
