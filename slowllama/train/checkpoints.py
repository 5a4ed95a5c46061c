"""Where a fine-tuning run keeps its state: the store itself (full fine-tuning) or an adapter folder (LoRA).

Both give the run loop the same few actions: resume (the run record and the steps done), begin a
step, commit it atomically, roll it back, and a folder for the run's logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from slowllama.engine.offloaded import LoRAState
from slowllama.errors import SlowllamaError
from slowllama.store.adapters import AdapterFolder
from slowllama.model.lora import LoRAConfig, init_params, parse_targets
from slowllama.store.store import Store

# settings that define a run: changing them on resume changes the result, so it is reported
RUN_KEYS = ("data", "batch_size", "accumulate", "seq_len", "lr", "optimizer", "adam_betas", "adam_eps",
            "weight_decay", "optim_dtype", "lr_schedule", "warmup_steps", "grad_clip", "clip_norm", "dropout",
            "seed", "order", "steps", "master_weights", "rounding", "lora_rank", "lora_alpha", "lora_dropout",
            "lora_targets", "pack", "mask_prompt", "val_split")


def run_settings(s) -> dict:
    return {k: getattr(s, k) for k in RUN_KEYS if hasattr(s, k)}


def report_changes(recorded: dict, wanted: dict, log: Callable[[str], None]) -> None:
    changed = [f"{k} {recorded.get(k)!r} -> {wanted[k]!r}" for k in wanted
               if k != "steps" and recorded.get(k) != wanted[k]]
    if changed:
        log("resuming with changed settings (the result will differ from an uninterrupted run): " + ", ".join(changed))


class StoreCheckpoint:
    """Full fine-tuning: the store is the working copy, and every step is committed to it."""

    def __init__(self, store: Store):
        self.store = store
        self.run_dir = store.run_dir

    def resume(self, s, log) -> tuple[dict, int]:
        """The run record (manifest "run") and how many of its steps are done."""
        run = self.store.manifest.get("run")
        wanted = run_settings(s)
        if run is None or s.new_run:  # recorded by the first step's commit
            return {"start_step": self.store.step, "settings": wanted}, 0
        report_changes(run["settings"], wanted, log)
        return {**run, "settings": wanted}, self.store.step - run["start_step"]

    def begin(self) -> None:
        self.store.begin_step(self.store.step + 1)

    def commit(self, number: int, run: dict) -> None:
        self.store.commit(run["start_step"] + number, {"run": run})

    def rollback(self) -> None:
        self.store.rollback()

    @property
    def bytes_written(self) -> int:
        return self.store.bytes_written


class AdapterCheckpoint:
    """LoRA: the base store is only read; adapters, their optimizer state and the run go to the adapter folder."""

    def __init__(self, store: Store, s, device, log):
        if not s.adapter_path:
            raise SlowllamaError("--adapter-path: required with --lora-rank (the folder for the adapters)")
        self.folder = AdapterFolder(Path(s.adapter_path))
        self.folder.open_for_training(log)
        self.run_dir = self.folder.path
        self.save_every, self.steps = s.save_every, s.steps
        args = store.args
        alpha = s.lora_alpha if s.lora_alpha is not None else 2.0 * s.lora_rank
        cfg = LoRAConfig(s.lora_rank, alpha, s.lora_dropout,
                         parse_targets(s.lora_targets)).validate()
        state = None if s.new_run else self.folder.state()
        if state is not None:
            self.folder.load_config(args)  # refuses an adapter of another model
            self.done, params, optim, self.run = self.folder.load_training_state(device)
        else:
            self.done, params, optim, self.run = 0, init_params(args, cfg, s.seed, device), {}, None
            self.folder.write_config(cfg, args)
        self.lora = LoRAState(cfg, {k: nn.Parameter(v) for k, v in params.items()}, optim)

    def resume(self, s, log) -> tuple[dict, int]:
        wanted = run_settings(s)
        if self.run is None:
            return {"start_step": 0, "settings": wanted}, 0
        report_changes(self.run.get("settings", {}), wanted, log)
        return {**self.run, "settings": wanted}, self.done

    def begin(self) -> None:
        pass

    def commit(self, number: int, run: dict) -> None:
        snapshot = number % self.save_every == 0 or number == self.steps
        self.folder.save(number, self.lora.params, self.lora.optim_state, run, snapshot)

    def rollback(self) -> None:
        pass

    @property
    def bytes_written(self) -> int:
        return self.folder.bytes_written

    def close(self) -> None:
        self.folder.close()


class FollowerCheckpoint:
    """Ranks > 0 of a torchrun: the run's state lives with rank 0, which alone writes and commits.

    With LoRA, these ranks train their own copy of the adapters (every rank applies the same update
    to the same summed gradient), starting from rank 0's, received here.
    """

    run_dir = None
    bytes_written = 0

    def __init__(self, fleet, leader_lora: "LoRAState | None", device):
        self.lora = share_adapters(fleet, leader_lora, device)

    def begin(self) -> None:
        pass

    def commit(self, number: int, run: dict) -> None:
        pass

    def rollback(self) -> None:
        pass


def share_adapters(fleet, lora: "LoRAState | None", device) -> "LoRAState | None":
    """Rank 0's LoRA adapters and their optimizer state, on every rank (collective; None without LoRA)."""
    shapes = fleet.broadcast_object(None if lora is None else (
        lora.cfg, {k: tuple(p.shape) for k, p in lora.params.items()},
        {k: (tuple(t.shape), t.dtype) for k, t in lora.optim_state.items()}))
    if shapes is None:
        return None
    cfg, param_shapes, state_shapes = shapes
    if lora is None:
        lora = LoRAState(cfg, {k: nn.Parameter(torch.empty(shape, device=device)) for k, shape in param_shapes.items()},
                         {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in state_shapes.items()})
    fleet.broadcast({k: p.data for k, p in lora.params.items()})
    fleet.broadcast(lora.optim_state)
    return lora
