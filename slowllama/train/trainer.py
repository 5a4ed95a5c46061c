"""The one owner of a run's training steps: each step's transaction, and the run's commit policy.

A step: begin (the store's journal, at the start of each commit period), the engine's forward,
backward and updates (twice with exact clipping: a norm pass, then the real step), then at a
commit point the resident updates written back (several ranks: each its own modules) and the step
committed atomically (by rank 0, once every rank's files are durable: checkpoints.py); on any failure
the step rolled back, the resident weights that may hold its updates dropped. Commit points: every
step while the model streams; with a model that stays resident, every `save_every` steps, at the
run's last step and when a stop is asked for (the store is then written only there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from slowllama.engine.chain import OffloadedModel
from slowllama.engine.step import NonFiniteLoss, Step, StepResult
from slowllama.optim.schedule import clip_coefficient
from slowllama.store.manifest import RunRecord


@dataclass(frozen=True)
class StepOutcome:
    result: StepResult
    committed: bool  # the step is durable (the store, or the adapter folder, holds it)
    stop: int  # a signal number any rank received during the step: the run stops after it (0: none)
    spilled_bytes: int  # activations that went to the scratch folder


class Trainer:
    """Steps of one run on an engine, committed to a checkpoint (train/checkpoints.py).

    run: the run record committed with each step (None: commits without one, the step numbers then the store's
    own, as a benchmark's);
    done: steps of the run already committed; steps: the run's last step (always committed; None:
    no last step, and what follows the last commit point can be dropped by abandon());
    grad_clip, clip_norm: --grad-clip and --clip-norm; stop: a poll for a signal asking the run to
    stop (every rank polls it at the same point of a step, a collective).
    """

    def __init__(self, engine: OffloadedModel, checkpoint, run: Optional[RunRecord] = None, *, done: int = 0,
                 steps: Optional[int] = None, save_every: int = 1, grad_clip: float = 0.0,
                 clip_norm: str = "previous", stop: Optional[Callable[[], int]] = None,
                 log: Callable[[str], None] = print):
        self.engine, self.checkpoint, self.run = engine, checkpoint, run
        self.steps, self.grad_clip, self.clip_norm, self.stop = steps, grad_clip, clip_norm, stop
        self.committed = done  # the run's last committed step
        self.commit_every = 1
        self._begun = False  # the steps since the last commit point are under way
        if engine.lora is None and engine.fits_in_memory():
            engine.defer_writes()
            self.commit_every = save_every
            log(f"the model fits in memory: it stays resident and the store is written every {save_every} steps")

    def step(self, number: int, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
             micro_offset: int = 0) -> StepOutcome:
        """Make step `number` (1-based in the run) over this rank's microbatches, and commit it if it is a commit
        point. micro_offset: the step-wide index of this rank's first microbatch (several ranks)."""
        engine, fleet = self.engine, self.engine.fleet
        acts = engine.activations()
        if not self._begun:
            self.checkpoint.begin()
            self._begun = True
        try:
            coef = 1.0
            if self.grad_clip and engine.lora is None:  # LoRA clips exactly inside the step
                norm = self.run.grad_norm if self.run is not None else None
                if self.clip_norm == "exact" or norm is None:  # norm pass: the gradient, no update
                    norm = engine.train_step(Step(number, lr, update=False, micro_offset=micro_offset), batches,
                                             acts).grad_norm
                coef = clip_coefficient(norm, self.grad_clip)
            result = engine.train_step(Step(number, lr, coef, max_grad_norm=self.grad_clip,
                                            micro_offset=micro_offset), batches, acts)
            if self.run is not None:
                self.run = replace(self.run, grad_norm=result.grad_norm)
            stop = fleet.max(self.stop()) if self.stop is not None else 0  # a signal to any rank stops them all
            if number % self.commit_every == 0 or number == self.steps or stop:
                self._commit(number)
        except NonFiniteLoss as e:
            # resident weights are the last good step's (on every rank: the loss is the same everywhere)
            if e.untouched and self.committed < number - 1 and (e.everywhere or not fleet.active):
                self._commit(number - 1)
            else:
                self._roll_back()
            raise
        except BaseException:
            self._roll_back()
            raise
        finally:
            acts.clear()
        return StepOutcome(result, self.committed == number, stop, acts.bytes_spilled)

    def abandon(self) -> None:
        """Drop the steps made since the last commit point (a benchmark's store keeps its last commit)."""
        if self._begun:
            self._roll_back()

    def _commit(self, number: int) -> None:
        self.engine.write_back()  # every rank its own modules
        self.checkpoint.commit(number, self.run)
        self.committed, self._begun = number, False

    def _roll_back(self) -> None:
        self.engine.discard_step()
        self.checkpoint.rollback()
        self._begun = False
