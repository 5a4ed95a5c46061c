"""Updates: one optimizer step over a module's parts, over some rows of the embeddings, or over the adapters.

A module's update runs part by part (store/state_parts.py: rows of one weight), so that only a
part's optimizer state and master weights are in flight at once: each is read ahead by the
pipeline, updated and handed back to it (written at once, or kept dirty until a commit point with
deferred writes) while the next is read. Arithmetic in fp32, on the master copy if there is one (in
place), else on the stored weights upcast, rounded back to the store's dtype (stochastically if so
configured); fused into one pass per part where compiled (the optimizer's `fused`, its rounding bits
hashed inside the pass), eager otherwise (bits drawn from a generator): optim/rounding.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from slowllama.engine.compiled import CompiledUpdates
from slowllama.engine.pipeline import Pipeline
from slowllama.engine.step import Step, Tally, module_seed
from slowllama.errors import SlowllamaError
from slowllama.optim.base import Optimizer
from slowllama.optim.rounding import hashed_bits, round_to, round_with_bits, rounding_bits
from slowllama.optim.schedule import clip_coefficient
from slowllama.store.state_parts import StatePart, piece_name
from slowllama.store.store import Store


class Updater:
    """The optimizer applied to what a backward pass has made final, the results handed to the pipeline.

    master: the store keeps fp32 master weights (16-bit stores); stochastic: round bf16 weights
    stochastically, from bits seeded by (seed, step, module); deferred: updates stay resident until
    the next commit point (a model that fits in memory) instead of being written at once.
    """

    def __init__(self, store: Store, pipe: Pipeline, optimizer: Optimizer, device: torch.device, names: list[str],
                 *, master: bool, stochastic: bool, seed: int, compiled: Optional[CompiledUpdates]):
        self.store, self.pipe, self.optimizer, self.device = store, pipe, optimizer, device
        self.names, self.master, self.stochastic, self.seed = names, master, stochastic, seed
        self.compiled = compiled if not master else None  # the fused updates round from a 16-bit weight
        self.deferred = False
        # the update number last applied to each first part of an update (and "adapters"), so that the next need
        # not read the state's step count back from the device; forgotten with a failed step's resident state
        self.numbers: dict[str, int] = {}

    @property
    def state_kinds(self) -> list[str]:
        """What a module's update reads beside its weights, part by part: master weights, optimizer state."""
        return (["master"] if self.master else []) + (["optim"] if self.optimizer.stateful else [])

    def module(self, name: str, grads: dict[str, torch.Tensor], step: Step, tally: Tally) -> Optional[dict]:
        """Apply the optimizer to a module's accumulated gradients and hand its new weights (and state) to the
        pipeline. Returns the new weights in the store's dtype (None in a norm pass, which updates nothing).

        The resident tensors may be updated in place, so a failed step must drop them (Pipeline.discard).
        """
        tally.record(f"{name}.", grads)
        if not step.update:
            return None
        tally.touched = True
        weights = self.pipe.get(("modules", name))
        new = self._apply(name, weights, grads, self.store.state_parts(name), step)
        self.keep(name, "modules", new)
        return new

    def weight(self, name: str, key: str, grad: torch.Tensor, step: Step, tally: Tally) -> Optional[torch.Tensor]:
        """The same for one weight of a module (a block streamed by weight): its parts only, handed to the
        pipeline as the piece `name/key`."""
        tally.record(f"{name}.", {key: grad})
        if not step.update:
            return None
        tally.touched = True
        piece = piece_name(name, key)
        weights = self.pipe.get(("modules", piece))
        parts = [p for p in self.store.state_parts(name) if p.key == key]
        new = self._apply(name, weights, {key: grad}, parts, step)
        self.keep(piece, "modules", new)
        return new[key]

    def _apply(self, name: str, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
               parts: list[StatePart], step: Step) -> dict[str, torch.Tensor]:
        """The optimizer over `parts` (rows of the weights in `weights`), part by part; returns the new weights."""
        number = scalars = None  # the update's number (optimizers that count steps), the fused update's constants
        counts = {k: sum(p.key == k for p in parts) for k in weights}
        new: dict[str, torch.Tensor] = {}  # a weight of several parts: filled part by part (no second copy)
        seeds = {k: self._rounding_seed(name, k, step.number) for k in counts}  # None: round to nearest
        # compiled updates hash their rounding bits from a key and the part's first element (rounding.py): one table
        keys = (self._on_device([[seeds[p.key] & 0xFFFFFFFF, p.start * math.prod(p.weight_shape[1:])] for p in parts],
                                torch.int64) if self.compiled is not None and any(s is not None for s in seeds.values())
                else None)
        gen, gen_key = None, None
        for i, part in enumerate(parts):
            seed = seeds[part.key]
            if keys is None and part.key != gen_key:  # each weight's bits are its own, whatever order weights come in
                gen, gen_key = self._generator(seed), part.key
            w, g = weights[part.key][part.rows], grads[part.key][part.rows]
            noise = keys[i] if keys is not None and seed is not None else None
            bits = rounding_bits(w, gen) if gen is not None else None  # drawn in part order, however updated
            state = self._state(part, w) if self.optimizer.stateful else {}
            if number is None and self.optimizer.counts_steps:  # every part has had the same updates
                number = self._number(parts[0].name, state["step"])
            out = None
            if self.compiled is not None:
                scalars = scalars if scalars is not None else self._scalars(step, number)
                out = self.compiled(w, g, *scalars, tuple(state[f"{part.key}.{n}"] for n in
                                                          self.optimizer.state_names), noise)
            if out is not None:
                new_w, new_state = out
                state = ({"step": state["step"] + 1} if self.optimizer.counts_steps else {}) | {
                    f"{part.key}.{n}": t for n, t in zip(self.optimizer.state_names, new_state)}
            else:  # eager (or compiling failed: then the compiled path's bits, hashed here)
                if noise is not None:  # (a key only where the weight rounds stochastically: a bf16 store)
                    bits = hashed_bits(noise, w.shape)
                g = g.float() * step.clip_coef if step.clip_coef != 1.0 else g.float()
                if self.master and self.pipe.has(("master", part.name)):
                    w32 = self.pipe.get(("master", part.name))[part.key]
                else:
                    w32 = w.float()
                self.optimizer.update({part.key: w32}, {part.key: g}, state, step.lr, number)
                new_w = round_with_bits(w32, self.store.dtype, bits)
                if self.master:
                    self.keep(part.name, "master", {part.key: w32})
            if state:
                self.keep(part.name, "optim", state)
            if counts[part.key] == 1:
                new[part.key] = new_w
            else:
                if part.key not in new:
                    new[part.key] = torch.empty(weights[part.key].shape, dtype=new_w.dtype, device=new_w.device)
                new[part.key][part.rows] = new_w
        return new

    def _number(self, key: str, count: torch.Tensor) -> int:
        """The number of the update about to be made of what `key` names, its state's step count `count`: one
        device sync the first time, then counted here."""
        number = self.numbers[key] + 1 if key in self.numbers else int(count.item()) + 1
        self.numbers[key] = number
        return number

    def forget(self) -> None:
        """After a failed step: its update numbers may never have been committed."""
        self.numbers.clear()

    def _state(self, part: StatePart, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A part's optimizer state: from the store (checked to be this optimizer's), or fresh."""
        if not self.pipe.has(("optim", part.name)):
            return self.optimizer.init_state({part.key: w})
        state = self.pipe.get(("optim", part.name))
        if set(state) != self.optimizer.state_keys(part.key):
            raise SlowllamaError(f"{self.store.path}: the optimizer state of {part.name} holds "
                                 f"{', '.join(sorted(state))}, not the state of --optimizer {self.optimizer.name} "
                                 "(the store was trained with another optimizer)")
        # a run that changed --optim-dtype: the stored moments in the dtype asked for now (written so at the update)
        want = self.optimizer.state_dtype
        return {k: t if k == "step" or t.dtype == want else t.to(want) for k, t in state.items()}

    def _scalars(self, step: Step, number: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The device scalars of a module's fused updates, (clip coefficient, the optimizer's): one copy a module."""
        both = self._on_device([step.clip_coef, *self.optimizer.scalars(step.lr, number)], torch.float32)
        return both[0], both[1:]

    def _on_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host table on the device without waiting for the device: a copy from pageable memory would
        wait for every kernel queued before it (a GPU sync per module), one from pinned memory does not."""
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t.to(self.device)

    def rows(self, name: str, key: str, ids: torch.Tensor, grad: torch.Tensor, step: Step,
             tally: Tally) -> Optional[dict[str, torch.Tensor]]:
        """SGD on some rows of one weight: w[ids] -= lr * grad, the other rows untouched (their gradient is 0);
        only those rows are handed to the pipeline as changed. Returns the module's weights, updated in place
        (None in a norm pass)."""
        grad = grad.float()
        tally.record(f"{name}.", {key: grad})
        if not step.update:
            return None
        if step.clip_coef != 1.0:
            grad.mul_(step.clip_coef)
        tally.touched = True
        tensors = self.pipe.get(("modules", name))
        rows = tensors[key][ids].float()
        self.optimizer.update({key: rows}, {key: grad}, {}, step.lr)
        tensors[key][ids] = round_to(rows, self.store.dtype, self._generator(self._rounding_seed(name, key,
                                                                                                step.number)))
        self.keep(name, "modules", tensors, rows={key: ids})
        return tensors

    def adapters(self, params: dict[str, nn.Parameter], optim_state: dict[str, torch.Tensor],
                 grads: dict[str, torch.Tensor], step: Step, tally: Tally) -> dict[str, torch.Tensor]:
        """The optimizer on all resident LoRA adapters at once, after the whole backward (so their clipping to
        step.max_grad_norm is exact); returns the optimizer state (created at the first update)."""
        tally.record("", grads)
        if not step.update:
            return optim_state
        coef = clip_coefficient(tally.grad_norm(), step.max_grad_norm) if step.max_grad_norm else 1.0
        if coef != 1.0:
            torch._foreach_mul_(list(grads.values()), coef)
        tally.touched = True
        if self.optimizer.stateful and not optim_state:
            optim_state = self.optimizer.init_state(params)
        number = self._number("adapters", optim_state["step"]) if self.optimizer.counts_steps else None
        with torch.no_grad():
            self.optimizer.update({k: p.data for k, p in params.items()}, grads, optim_state, step.lr, number)
        return optim_state

    def keep(self, name: str, kind: str, tensors: dict[str, torch.Tensor],
             rows: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Hand a module's new version to the pipeline (rows: {weight: ids} when only those rows changed)."""
        self.pipe.put((kind, name), tensors, persist=not self.deferred, rows=rows)

    def _rounding_seed(self, name: str, key: str, number: int) -> Optional[int]:
        """The seed of a weight's stochastic rounding bits in a step (None: round to nearest)."""
        if not (self.stochastic and not self.master and self.store.dtype == torch.bfloat16):
            return None
        weight_index = list(self.store.expected_shapes[name]).index(key)
        return module_seed(self.seed, number, -1 - weight_index, self.names.index(name))

    def _generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        return torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
