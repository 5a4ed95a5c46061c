"""Where a fine-tuning run keeps its state: the store itself (full fine-tuning) or an adapter folder (LoRA).

Each gives the trainer the same few actions: resume (the run record and the steps done), begin a
step, commit it atomically, roll it back, and a folder for the run's logs. The run record is
a RunRecord (store/manifest.py): the store's step when the run began, the settings that define the run,
the last step's gradient norm (for --clip-norm previous).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from slowllama.engine.fleet import Fleet
from slowllama.errors import SlowllamaError
from slowllama.model.lora import LoRAConfig, LoRAState, init_params
from slowllama.store.adapters import AdapterFolder
from slowllama.store.manifest import RunRecord
from slowllama.store.shares import digest
from slowllama.store.store import Store
from slowllama.train.shares import HostLayout


def report_changes(recorded: dict, wanted: dict, log: Callable[[str], None]) -> None:
    """Say which settings that define the run differ from those it was recorded with."""
    changed = [f"{k} {recorded.get(k)!r} -> {wanted[k]!r}" for k in wanted
               if k != "steps" and recorded.get(k) != wanted[k]]
    if changed:
        log("resuming with changed settings (the result will differ from an uninterrupted run): " + ", ".join(changed))


class StoreCheckpoint:
    """Full fine-tuning: the store is the working copy, and every step is committed to it.

    With several ranks (a fleet), every rank has one over the same store: each writes the files of the modules it
    owns, and a commit is a collective: every rank makes its files durable and hands their entries to rank 0, which
    alone holds the journal and the lock and commits the manifest once all are in; the others then take the new
    manifest. A rank that fails before (or rank 0 failing the commit) leaves the store at its last step: every
    rank rolls back its own files, and the next start removes whatever a killed rank left. A rank that loses rank 0
    while waiting for the new manifest keeps its files (rank 0 may have committed them); the next start removes
    them if it did not.

    On the shares of a split store (hosts: train/shares.py's HostLayout), each host's lowest rank holds its share's
    journal and lock, and every share's manifest advances together, in two phases: once every rank's files are
    durable, every host's writer writes the next manifest durably beside its current one (prepared) and says so;
    once all have, each makes it current. A restart after a kill anywhere in this rolls every host forward or
    back to one step (Store.recover_share).
    """

    def __init__(self, store: Store, fleet: Optional[Fleet] = None, hosts: Optional[HostLayout] = None):
        self.store, self.fleet, self.hosts = store, fleet or Fleet(), hosts
        # a step whose files some host's prepared manifest may name: they stay, whatever follows, until the next
        # start decides (store/shares.recovery)
        self._keep = False

    @property
    def writes_manifest(self) -> bool:
        """Whether this rank writes its store's manifest and journal: rank 0, or on shares each host's first rank."""
        return self.fleet.main if self.hosts is None else self.hosts.leads(self.fleet.rank)

    @property
    def run_dir(self) -> Path:
        return self.store.run_dir

    def resume(self, wanted: dict, new_run: bool, log) -> tuple[RunRecord, int]:
        """The run record and how many of its steps are done; wanted: the settings that define the run."""
        run = self.store.run
        if run is None or new_run:  # recorded by the first step's commit
            return RunRecord(self.store.step, wanted), 0
        report_changes(run.settings, wanted, log)
        return replace(run, settings=wanted), self.store.step - run.start_step

    def begin(self) -> None:
        if self.writes_manifest:
            self.store.begin_step(self.store.step + 1)

    def commit(self, number: int, run: Optional[RunRecord]) -> None:
        """Commit step `number` of the run, the store's step start_step + number; without a run record (a
        benchmark's steps, the tests') the numbers are the store's own steps."""
        step = number if run is None else run.start_step + number
        fleet = self.fleet
        if not fleet.active:
            self.store.commit(step, run)
            return
        error: Optional[BaseException] = None
        try:
            mine = ("ok", self.store.durable())
        except Exception as e:  # told to the others, so that no rank commits without this rank's files
            error, mine = e, ("failed", f"rank {fleet.rank}: {e}")
        everyone = fleet.gather_objects(mine)
        failed = [what for status, what in everyone if status == "failed"]
        if failed:
            raise error or SlowllamaError(f"step {step} not committed: {failed[0]}")
        if self.hosts is not None:
            self._commit_across_hosts(step, run, everyone)
            return
        if fleet.main:
            before = self.store.manifest
            try:
                self.store.commit(step, run, shared=tuple(e for _, entries in everyone[1:] for e in entries))
            except BaseException as e:
                error = e
            # renamed, even if a later fsync failed: the others keep their files
            fleet.broadcast_object(self.store.manifest.to_json() if self.store.manifest is not before else None)
            if error is not None:
                raise error
        else:
            self._keep = True  # rank 0 may commit this rank's files and die before it says so: they stay
            manifest = fleet.broadcast_object(None)
            if manifest is None:
                self._keep = False
                raise SlowllamaError(f"step {step} not committed: rank 0 failed to commit it")
            self.store.adopt(manifest)
            self._keep = False

    def _commit_across_hosts(self, step: int, run: Optional[RunRecord], everyone: list) -> None:
        """The two phases, once every rank's files are durable (everyone: each rank's entries)."""
        fleet, error = self.fleet, None
        host = self.hosts.hosts[fleet.rank]
        ack = ("ok", None)
        self._keep = True  # (a rank that dies from here may leave a host prepared, this one's files named there)
        if self.writes_manifest:  # phase 1: every host's next manifest, durable beside the current one
            others = tuple(e for rank, (_, entries) in enumerate(everyone) if rank != fleet.rank for e in entries)
            try:
                self.store.prepare_commit(step, run, shared=others)
                ack = ("ok", digest(self.store.prepared_json()))
            except BaseException as e:
                error, ack = e, ("failed", f"host {host}: {e}")
        acks = fleet.gather_objects(ack)
        failed = [what for status, what in acks if status == "failed"]
        if not failed and len({d for _, d in acks if d is not None}) > 1:  # (a guard: they are made alike)
            failed = [f"the hosts prepared different manifests for step {step}"]
        if failed:  # every rank knows: not prepared everywhere, so nowhere committed (rollback removes the files)
            if self.writes_manifest:
                self.store.drop_prepared()
            self._keep = False
            raise error or SlowllamaError(f"step {step} not committed: {failed[0]}")
        done = ("ok", None)
        if self.writes_manifest:  # phase 2: every host prepared it
            try:
                self.store.commit_prepared()
                done = ("ok", self.store.manifest.to_json())
            except BaseException as e:  # the next start rolls this host forward
                error, done = e, ("failed", f"host {host}: {e}")
        manifests = fleet.gather_objects(done)
        failed = [what for status, what in manifests if status == "failed"]
        if failed:
            raise error or SlowllamaError(f"step {step}: committed, but not on every host ({failed[0]}); the next "
                                          "start finishes it")
        if not self.writes_manifest:
            self.store.adopt(manifests[self.hosts.leader(fleet.rank)][1])
        self._keep = False

    def rollback(self) -> None:
        if self._keep:  # the next start rolls every host forward or back (and removes what is not named)
            self._keep = False
            return
        self.store.rollback()

    @property
    def bytes_written(self) -> int:
        return self.store.bytes_written


class AdapterCheckpoint:
    """LoRA: the base store is only read; adapters, their optimizer state and the run go to the adapter folder."""

    def __init__(self, store: Store, adapter_path: Optional[str], cfg: LoRAConfig, seed: int, new_run: bool,
                 save_every: int, steps: int, device, log):
        if not adapter_path:
            raise SlowllamaError("--adapter-path: required with --lora-rank (the folder for the adapters)")
        self.folder = AdapterFolder(Path(adapter_path))
        self.folder.open_for_training(log, protected=(store.path,))
        try:  # the folder is locked from here: unlocked again if what it holds is refused
            self.run_dir = self.folder.path
            store.scratch_elsewhere = self.folder.path / "scratch"  # the base store is only read
            if store.scratch_elsewhere.is_symlink():  # spills are written there: never through a link
                store.scratch_elsewhere.unlink()
            shutil.rmtree(store.scratch_elsewhere, ignore_errors=True)  # a killed run's spilled activations
            self.save_every, self.steps = save_every, steps
            args = store.args
            state = None if new_run else self.folder.state()
            if state is not None:  # the folder's adapters define rank and targets: its config wins over the flags
                cfg = self._folder_config(cfg, self.folder.load_config(args), log)  # refuses another model's
                self.done, params, optim, run = self.folder.load_training_state(device)
                self.run = RunRecord(run.get("start_step", 0), run.get("settings", {}), run.get("grad_norm"))
            elif self.folder.starts_from_peft():  # PEFT's adapters: step 0 of a new run (the folder is left as it
                cfg = self._folder_config(cfg, self.folder.load_config(args), log)  # is until the first save)
                self.done, params, optim, self.run = 0, self.folder.load_params(args, cfg, device), {}, None
                log(f"{self.folder.path}: training on from the PEFT adapters it holds")
            else:
                self.done, params, optim, self.run = 0, init_params(args, cfg, seed, device), {}, None
                self.folder.write_config(cfg, args, str(store.path.resolve()))
            self.config = AdapterFolder.config_dict(cfg, args, str(store.path.resolve()))
            self.lora = LoRAState(cfg, {k: nn.Parameter(v) for k, v in params.items()}, optim)
        except BaseException:
            self.folder.close()
            raise

    @staticmethod
    def _folder_config(flags: LoRAConfig, folder: LoRAConfig, log) -> LoRAConfig:
        if (folder.rank, folder.alpha, folder.dropout, set(folder.targets)) != \
                (flags.rank, flags.alpha, flags.dropout, set(flags.targets)):
            log(f"LoRA of the adapter folder: rank {folder.rank}, alpha {folder.alpha:g}, dropout {folder.dropout:g}, "
                f"targets {','.join(folder.targets)} (the --lora-* flags ask rank {flags.rank}, alpha "
                f"{flags.alpha:g}, dropout {flags.dropout:g}, targets {','.join(flags.targets)})")
        return folder

    def resume(self, wanted: dict, new_run: bool, log) -> tuple[RunRecord, int]:
        if self.run is None:
            return RunRecord(0, wanted), 0
        report_changes(self.run.settings, wanted, log)
        return replace(self.run, settings=wanted), self.done

    def begin(self) -> None:
        pass

    def commit(self, number: int, run: Optional[RunRecord]) -> None:
        snapshot = number % self.save_every == 0 or number == self.steps
        self.folder.save(number, self.lora.params, self.lora.optim_state, run.to_json() if run else {}, snapshot,
                         self.config)

    def rollback(self) -> None:
        pass

    @property
    def bytes_written(self) -> int:
        return self.folder.bytes_written

    def close(self) -> None:
        self.folder.close()


class NoCheckpoint:
    """Steps whose state is kept by someone else, or by no one: ranks > 0 of a torchrun (rank 0 alone writes and
    commits), and a benchmark of LoRA steps."""

    run_dir = None
    bytes_written = 0

    def begin(self) -> None:
        pass

    def commit(self, number: int, run: Optional[RunRecord]) -> None:
        pass

    def rollback(self) -> None:
        pass


def share_adapters(fleet: Fleet, lora: Optional[LoRAState], device) -> Optional[LoRAState]:
    """Rank 0's LoRA adapters and their optimizer state, on every rank (collective; None without LoRA).

    Ranks > 0 train their own copy of the adapters (every rank applies the same update to the same
    summed gradient), starting from rank 0's, received here.
    """
    shapes = fleet.broadcast_object(None if lora is None else (
        lora.cfg, {k: tuple(p.shape) for k, p in lora.params.items()},
        {k: (tuple(t.shape), t.dtype) for k, t in lora.optim_state.items()}))
    if shapes is None:
        return None
    cfg, param_shapes, state_shapes = shapes
    if lora is None:
        params = {k: nn.Parameter(torch.empty(shape, device=device)) for k, shape in param_shapes.items()}
        state = {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in state_shapes.items()}
        lora = LoRAState(cfg, params, state)
    fleet.broadcast({k: p.data for k, p in lora.params.items()})
    fleet.broadcast(lora.optim_state)
    return lora
