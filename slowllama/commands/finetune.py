"""`slowllama finetune`: the run (data, resume, steps, eval, logging, progress, signals), on one
rank or several."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from slowllama.commands.common import check_disk_for_steps, check_seq_len, log_kept_graphs, make_engine, resolve_device
from slowllama.commands.evaluate import evaluate
from slowllama.commands.models import prepared_store, store_path
from slowllama.commands.plot import plot_run
from slowllama.data.windows import count_windows, load_train_val, microbatches, step_windows
from slowllama.engine.fleet import Fleet, data_digest, start_fleet
from slowllama.engine.generation import generate
from slowllama.engine.step import NonFiniteLoss
from slowllama.errors import SlowllamaError
from slowllama.model.args import dtype_from_name
from slowllama.model.lora import LoRAConfig, parse_targets
from slowllama.model.shapes import model_param_count
from slowllama.model.tokenizer import load_tokenizer
from slowllama.optim.base import Optimizer
from slowllama.optim.registry import make_optimizer
from slowllama.optim.schedule import SCHEDULES, lr_at
from slowllama.settings import DEFAULT_LORA_LR, DEFAULT_LR, FinetuneSettings
from slowllama.sizes import format_size, host_peak_rss
from slowllama.store.atomic import write_json_atomic
from slowllama.store.destination import check_run_folder
from slowllama.store.manifest import MANIFEST, Manifest
from slowllama.store.safe_files import open_append
from slowllama.store.store import Store
from slowllama.train.checkpoints import AdapterCheckpoint, NoCheckpoint, StoreCheckpoint, share_adapters
from slowllama.train.shares import ShareRefused, open_share
from slowllama.train.signals import StoppedBySignal, StopRequest, exit_code, signal_name
from slowllama.train.trainer import Trainer

# settings that define a run: changing them on resume changes the result, so it is reported
RUN_KEYS = ("data", "batch_size", "accumulate", "seq_len", "lr", "optimizer", "adam_betas", "adam_eps",
            "weight_decay", "optim_dtype", "lr_schedule", "warmup_steps", "grad_clip", "clip_norm", "dropout",
            "seed", "order", "steps", "master_weights", "rounding", "lora_rank", "lora_alpha", "lora_dropout",
            "lora_targets", "pack", "mask_prompt", "val_split")


def run_settings(s: FinetuneSettings) -> dict:
    return {k: getattr(s, k) for k in RUN_KEYS}


def validate_finetune(s: FinetuneSettings) -> None:
    if not s.data:
        raise SlowllamaError("--data: required (a .txt or .jsonl file)")
    if s.val_data and s.val_split:
        raise SlowllamaError("--val-data and --val-split: give one of them, not both")
    if not (0.0 <= s.val_split < 1.0):
        raise SlowllamaError(f"--val-split: must be a fraction in [0, 1), got {s.val_split}")
    for name in ("steps", "batch_size", "accumulate", "seq_len"):
        if getattr(s, name) < 1:
            raise SlowllamaError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(s, name)}")
    if s.lr is not None and not (math.isfinite(s.lr) and s.lr > 0):
        raise SlowllamaError(f"--lr: must be a positive number, got {s.lr}")
    if not 0.0 <= s.dropout < 1.0:
        raise SlowllamaError(f"--dropout: must be in [0, 1), got {s.dropout}")
    if s.log_every < 0:
        raise SlowllamaError(f"--log-every: must be >= 0, got {s.log_every}")
    if s.eval_every < 0:
        raise SlowllamaError(f"--eval-every: must be >= 0, got {s.eval_every}")
    if s.lora_rank < 0:
        raise SlowllamaError(f"--lora-rank: must be >= 0, got {s.lora_rank}")
    if s.save_every < 1:
        raise SlowllamaError(f"--save-every: must be at least 1, got {s.save_every}")
    if s.lora_rank and s.master_weights != "none":
        raise SlowllamaError("--master-weights: LoRA trains fp32 adapters; the base is never updated")
    if s.completion_tokens < 0:
        raise SlowllamaError(f"--completion-tokens: must be >= 0, got {s.completion_tokens}")
    if s.warmup_steps < 0:
        raise SlowllamaError(f"--warmup-steps: must be >= 0, got {s.warmup_steps}")
    if not (math.isfinite(s.grad_clip) and s.grad_clip >= 0):
        raise SlowllamaError(f"--grad-clip: must be >= 0, got {s.grad_clip}")
    if s.optimizer == "sgd" and s.weight_decay:
        raise SlowllamaError("--weight-decay: applies to --optimizer adamw (SGD here has no weight decay)")
    if not s.adam_eps > 0:
        raise SlowllamaError(f"--adam-eps: must be > 0, got {s.adam_eps}")
    if not s.weight_decay >= 0:
        raise SlowllamaError(f"--weight-decay: must be >= 0, got {s.weight_decay}")
    if s.adapter_path and not s.lora_rank:  # never a silent full fine-tune of the store in place
        raise SlowllamaError(f"--adapter-path: trains LoRA adapters only with --lora-rank R (e.g. --lora-rank 8); "
                             f"without it finetune would update {s.store} itself")
    if s.lr_schedule not in SCHEDULES:
        raise SlowllamaError(f"--lr-schedule: unknown schedule {s.lr_schedule!r}")


def run(s: FinetuneSettings, log: Callable[[str], None]) -> None:
    """`slowllama finetune`: with --json, one JSON object per step on stdout."""
    finetune(s, log, (lambda metrics: print(json.dumps(metrics), flush=True)) if s.json else (lambda metrics: None))


def finetune(s: FinetuneSettings, log: Callable[[str], None], emit: Callable[[dict], None]) -> dict:
    """Fine-tune: the store in place, or LoRA adapters on it (--lora-rank); returns the last step's metrics.

    emit() receives each step's metrics. Under torchrun every rank runs this; each reads and writes the
    modules it owns (engine/replicas.py), rank 0 commits, logs and emits.
    """
    validate_finetune(s)
    if s.optimizer == "auto":  # recorded as what it resolves to
        s = replace(s, optimizer="adamw" if s.lora_rank else "sgd")
    if s.lr is None:  # likewise
        s = replace(s, lr=DEFAULT_LORA_LR if s.lora_rank else DEFAULT_LR[s.optimizer])
    fleet = start_fleet(s.device, s.dist_backend, log)
    try:
        if fleet.main:
            result = _finetune_leader(fleet, s, log, emit)
        else:
            result = _finetune_follower(fleet, s, emit)
    except StoppedBySignal:  # every rank stopped after the same committed step
        fleet.close()
        raise
    fleet.close()  # not after an error: with NCCL it can wait forever for the ranks that stopped
    return result


def _finetune_leader(fleet: Fleet, s: FinetuneSettings, log, emit) -> dict:
    lora = s.lora_rank > 0
    if fleet.active:
        check_fleet(fleet, s)
    try:
        # (a checkpoint folder or hub id: its store, prepared first if need be)
        path, problem = None, None
        try:
            path = prepared_store(s.store, log)
            if not lora:
                refuse_quantized(path)
        except Exception as e:  # raised once the other ranks know it (they are in shares_of's collectives)
            problem = e
        share = shares_of(fleet, path, lora, log, problem)  # several hosts' shares of a split store: opened together
        # (a whole store: recovers an interrupted step)
        store, hosts = share or (Store.open(path, writable=not lora, log=log), None)
    finally:
        fleet.barrier()  # the followers open the store once it is consistent (or learn that it failed)
    checkpoint = None
    try:
        checkpoint = (AdapterCheckpoint(store, s.adapter_path, lora_config(s), s.seed, s.new_run, s.save_every,
                                        s.steps, resolve_device(s)[0], log) if lora
                      else StoreCheckpoint(store, fleet, hosts))
        return _finetune(store, checkpoint, s, log, emit, fleet)
    except KeyboardInterrupt as e:  # a second Ctrl-C: the steps since the last commit were rolled back
        log(f"interrupted: {kept_by(checkpoint, store)}; run the same command again to resume")
        raise StoppedBySignal(getattr(e, "code", 130)) from None
    finally:
        if isinstance(checkpoint, AdapterCheckpoint):
            checkpoint.close()
        store.close()


def _finetune_follower(fleet: Fleet, s: FinetuneSettings, emit) -> dict:
    """A rank > 0: computes its share of every step, reads and writes the modules it owns; rank 0 reports every
    error the ranks share."""
    quiet = lambda message: None  # noqa: E731 (rank 0 says everything once)
    try:
        check_fleet(fleet, s)
        lora = s.lora_rank > 0
        path = store_path(s.store)[0]
        try:
            share = shares_of(fleet, path, lora, quiet)
        finally:
            fleet.barrier()  # (as rank 0 does, also after a refusal: it says it, then all stop)
        store, hosts = share or (Store.open(path, follower=True, co_writer=not lora), None)
        return _finetune(store, None if lora else StoreCheckpoint(store, fleet, hosts), s, quiet, lambda m: None,
                         fleet)
    except NonFiniteLoss as e:
        if not e.everywhere:  # a gradient of a module this rank owns: only this rank saw it
            raise SlowllamaError(f"rank {fleet.rank}: {e}") from None
        raise SystemExit(2) from None
    except SameOnEveryRank:
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        raise StoppedBySignal(getattr(e, "code", 130)) from None
    except SlowllamaError as e:
        raise SlowllamaError(f"rank {fleet.rank}: {e}") from e
    except (RuntimeError, OSError) as e:  # most often: another rank stopped, and its collectives with it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SlowllamaError(f"rank {fleet.rank}: stopped ({type(e).__name__}: {first})") from e


def kept_by(checkpoint, store: Store) -> str:
    """What a run stopped at once keeps: its last committed step, said exactly."""
    if isinstance(checkpoint, AdapterCheckpoint):
        with contextlib.suppress(SlowllamaError, OSError):
            state = checkpoint.folder.state()
            if state:
                return f"the adapters are at step {state['step']} of the run, saved"
        return "the adapter folder holds no saved step"
    run = store.run
    of_run = f" (step {store.step - run.start_step} of the run)" if run is not None else ""
    return f"the store is at step {store.step}{of_run}, committed"


class StallWatch:
    """One warning when the loss has not moved after a fair number of steps (a learning rate far too low)."""

    STEPS, EDGE, MOVE = 25, 5, 0.01  # after 25 steps of this process: the means of the first and last 5 within 1%

    def __init__(self, lr: float):
        self.lr, self.losses, self.said = lr, [], False

    def add(self, loss: float) -> str:
        self.losses.append(loss)
        if self.said or len(self.losses) != self.STEPS or not all(map(math.isfinite, self.losses)):
            return ""
        first = sum(self.losses[:self.EDGE]) / self.EDGE
        last = sum(self.losses[-self.EDGE:]) / self.EDGE
        if abs(last - first) > self.MOVE * abs(first):
            return ""
        self.said = True
        return (f"warning: the loss has not moved in {self.STEPS} steps ({first:.4f} -> {last:.4f}): --lr {self.lr:g} "
                "may be too low for this model; try a few times higher")


class SameOnEveryRank(SlowllamaError):
    """An error every rank finds the same way: rank 0 reports it, the others exit quietly."""


def check_fleet(fleet: Fleet, s: FinetuneSettings) -> None:
    """What several ranks need of the settings (every rank checks; rank 0 says it)."""
    windows = s.batch_size * s.accumulate
    if windows % fleet.world:
        raise SameOnEveryRank(f"--batch-size x --accumulate: the global batch of {windows} windows does not "
                              f"divide among {fleet.world} ranks")
    try:
        device = resolve_device(s)[0]
    except SlowllamaError as e:
        raise SameOnEveryRank(str(e)) from None
    if device.type == "mps":
        raise SameOnEveryRank("--device mps: several ranks need cuda (NCCL) or cpu (gloo)")


def shares_of(fleet: Fleet, path: Optional[Path], lora: bool, log, problem: Optional[BaseException] = None):
    """Several ranks given the shares of a split store (train/shares.py): (this rank's share, opened, and where the
    ranks are); None for a whole store (and for one rank, whose Store.open refuses a share). problem: why rank 0
    has no store to give (raised here, on every rank)."""
    if not fleet.active:
        if problem is not None:
            raise problem
        return None
    try:
        return open_share(fleet, path, lora, log, problem)
    except ShareRefused as e:
        if problem is not None:
            raise problem
        raise SameOnEveryRank(str(e)) from None


def share_store(fleet: Fleet, store: Store, lora: bool, log) -> None:
    """Whether every rank can own a share of the modules: it sees rank 0's store folder itself (full fine-tuning:
    rank 0 commits the files the others write there), or for LoRA, which only reads, the same files. If not (the
    ranks of other hosts without the folder), rank 0 reads, updates and writes every module, as the others only
    compute (a collective)."""
    pid = fleet.broadcast_object(os.getpid() if fleet.main else None)
    sees = fleet.main or (store.holds_every_file() if lora else store.locked_by(pid))
    fleet.shared_store = all(fleet.gather_objects(sees))
    if not fleet.shared_store:
        log(f"{store.path}: not every rank sees this store folder, so rank 0 reads, updates and writes every "
            "module and the other ranks compute")


def lora_config(s: FinetuneSettings) -> LoRAConfig:
    alpha = s.lora_alpha if s.lora_alpha is not None else 2.0 * s.lora_rank
    return LoRAConfig(s.lora_rank, alpha, s.lora_dropout, parse_targets(s.lora_targets)).validate()


def optimizer_of(s: FinetuneSettings) -> Optimizer:
    """The optimizer of finetune's settings (--optimizer resolved), with the hyperparameters it takes."""
    try:
        b1, b2 = (float(x) for x in str(s.adam_betas).split(","))
    except ValueError:
        raise SlowllamaError(f"--adam-betas: expected two numbers like 0.9,0.999, got {s.adam_betas!r}") from None
    return make_optimizer(s.optimizer, betas=(b1, b2), eps=s.adam_eps, weight_decay=s.weight_decay,
                          state_dtype=dtype_from_name(s.optim_dtype, "--optim-dtype"))


def refuse_quantized(path: Path) -> None:
    """Full fine-tuning never opens a quantized store for writing: it is a read-only base."""
    if (Path(path) / MANIFEST).is_file() and Manifest.read(path).quantization is not None:
        raise SlowllamaError(f"{path}: an NF4 store is a read-only base: full fine-tuning needs a store without "
                             "--quantize (train LoRA adapters on this one with --lora-rank)")


def _finetune(store: Store, checkpoint, s: FinetuneSettings, log, emit, fleet: Fleet) -> dict:
    check_seq_len(s.seq_len, store.args)
    tokenizer = load_tokenizer(store.path)
    data, val = load_train_val(s, tokenizer, log)
    if fleet.active:
        try:
            mine = {k: v for k, v in asdict(s).items() if k != "store" or fleet.owners is None}  # (hosts' shares)
            fleet.check_same(mine, data_digest([data.tokens, data.labels] + ([val.tokens] if val else [])))
        except SlowllamaError as e:
            raise SameOnEveryRank(str(e)) from None
    if fleet.active and fleet.owners is None:  # (the shares of a split store fix the owners)
        share_store(fleet, store, s.lora_rank > 0, log)
    if fleet.main:
        run, done = checkpoint.resume(run_settings(s), s.new_run, log)
    run, done = fleet.broadcast_object((run, done) if fleet.main else None)
    device = resolve_device(s)[0]
    if fleet.main:
        lora = getattr(checkpoint, "lora", None)
        if fleet.active:
            share_adapters(fleet, lora, device)
    else:
        checkpoint, lora = checkpoint or NoCheckpoint(), share_adapters(fleet, None, device)
    if fleet.main:
        n_windows = count_windows(data, s.seq_len)
        epochs = s.steps * s.batch_size * s.accumulate / n_windows
        log(f"training data: {n_windows} windows of {s.seq_len} tokens; {s.steps} steps of "
            f"{s.batch_size * s.accumulate} windows = {format(epochs, '.1f' if epochs >= 0.1 else '.2g')} epochs")
    if done >= s.steps:
        log(f"{checkpoint.run_dir if s.lora_rank else store.path}: the run has already finished {done} of "
            f"{s.steps} steps; nothing to do")
        if fleet.main and not (checkpoint.run_dir / "loss.png").exists():  # a run stopped in its last step
            plot_run(checkpoint.run_dir, log)
        return {"steps_done": done, "nothing_to_do": True}
    optimizer = optimizer_of(s)
    master = s.master_weights == "fp32" or store.has_master_weights
    if master and s.master_weights != "fp32":
        log(f"{store.path}: using the fp32 master weights the store already has")
    if s.rounding == "stochastic" and store.dtype == torch.float16 and not s.lora_rank:
        raise SameOnEveryRank("--rounding stochastic: implemented for bf16 stores, and this store is fp16 "
                             "(use --master-weights fp32 to keep small updates)")
    stochastic = s.rounding == "stochastic" or (s.rounding == "auto" and not master)
    batch_size, micro = fleet.rank_batch(s.batch_size, s.accumulate)
    engine = make_engine(store, s, optimizer=optimizer, dropout=s.dropout, seed=s.seed, master_weights=master,
                         stochastic_rounding=stochastic, lora=lora, train=True, batch_size=batch_size,
                         seq_len=s.seq_len, microbatches=micro, fleet=fleet, compile=s.compile,
                         keep_graphs=s.recompute == "auto", log=log)
    if engine.compile_note:
        log(engine.compile_note)
    log_kept_graphs(engine, batch_size, s.seq_len, micro, log)
    if lora is not None and fleet.main:
        trainable = sum(p.numel() for p in lora.params.values())
        total = model_param_count(store.args)["total"]
        log(f"LoRA: {trainable:,} trainable weights (rank {lora.cfg.rank} on {','.join(lora.cfg.targets)}; "
            f"{100 * trainable / total:.2f}% of the model's {total:,})")
    if not s.lora_rank and fleet.main:
        check_disk_for_steps(store, engine, s.batch_size * s.accumulate, s.seq_len)
    stop = StopRequest(log, kept=lambda: kept_by(checkpoint, store))
    trainer = Trainer(engine, checkpoint, run, done=done, steps=s.steps, save_every=s.save_every,
                      grad_clip=s.grad_clip, clip_norm=s.clip_norm, stop=lambda: stop.signum or 0, log=log)
    if fleet.active:
        log(engine.choose_replication())
        if fleet.owners is not None and not engine.replicas.replicate and (val is not None or s.prompt):
            raise SameOnEveryRank(f"--{'prompt' if s.prompt else 'val-split' if s.val_split else 'val-data'}: rank 0 "
                                  "evaluates alone, and its share lacks the other hosts' modules (kept as copies "
                                  "only when the model fits the device); evaluate the joined store instead")
    if fleet.main:  # atomically, never through a link planted in the run folder
        check_run_folder(checkpoint.run_dir)
        write_json_atomic(checkpoint.run_dir / "settings.json", {"settings": asdict(s), "start_step": run.start_step,
                                                                 "resumed_at": done, "ranks": fleet.world})
    if done:
        log(f"resuming the run at step {done} of {s.steps}")

    def eval_and_show(step: int) -> dict:
        out = {}
        if val is not None:
            result = evaluate(engine, val, s.seq_len, s.batch_size, progress=False)
            out = {"eval_loss": result["eval_loss"], "eval_ppl": result["eval_ppl"], "eval_tokens": result["tokens"]}
            log(f"step {step}: eval loss {out['eval_loss']:.4f}, ppl {out['eval_ppl']:.2f}")
        if s.prompt:
            text = generate(engine, tokenizer, s.prompt, s.completion_tokens)
            log(f"step {step}: {json.dumps(s.prompt + text, ensure_ascii=False)}")
        return out

    last = {}
    stall = StallWatch(s.lr)
    with stop.installed(), tqdm(total=s.steps, initial=done, desc="finetune", unit="step",
                                disable=None if fleet.main else True) as bar:
        for index in range(done, s.steps):
            number = index + 1  # 1-based step of the run
            inputs, targets = step_windows(data, index, s.batch_size * s.accumulate, s.seq_len, s.order, s.seed)
            mine, first_micro = fleet.share(inputs.shape[0], s.batch_size)
            batches = microbatches(inputs[mine], targets[mine], s.batch_size)
            read0, written0, t0 = store.bytes_read, store.bytes_written, time.perf_counter()
            adapter0 = checkpoint.bytes_written
            if engine.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(engine.device)
            lr = lr_at(number, s.steps, s.lr, s.lr_schedule, s.warmup_steps)
            outcome = trainer.step(number, batches, lr, first_micro)
            result = outcome.result
            seconds = time.perf_counter() - t0
            last = {"step": number, "loss": result.loss, "tokens": result.tokens, "seconds": seconds,
                    "tokens_per_second": result.tokens / seconds, "lr": lr, "grad_norm": result.grad_norm,
                    "bytes_read": store.bytes_read - read0, "bytes_written": store.bytes_written - written0,
                    "peak_rss_bytes": host_peak_rss()}
            if s.lora_rank:
                last["adapter_bytes_written"] = checkpoint.bytes_written - adapter0
            if engine.device.type == "cuda":
                last["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(engine.device)
            bar.set_postfix_str(f"loss {result.loss:.4f}, {last['tokens_per_second']:.0f} tok/s, {seconds:.2f} s/step")
            bar.update(1)
            if s.log_every and number % s.log_every == 0:
                gpu = f", peak GPU {format_size(last['peak_gpu_bytes'])}" if "peak_gpu_bytes" in last else ""
                log(f"step {number}: loss {result.loss:.4f}, lr {lr:.3g}, {last['tokens_per_second']:.0f} tok/s, "
                    f"{seconds:.2f} s/step, read {format_size(last['bytes_read'])}, "
                    f"written {format_size(last['bytes_written'])}, "
                    f"peak RSS {format_size(last['peak_rss_bytes'])}{gpu}")
            if fleet.main and (warning := stall.add(result.loss)):
                log(warning)
            if fleet.main and ((s.eval_every and number % s.eval_every == 0) or number == s.steps):
                last.update(eval_and_show(number))  # rank 0 alone: the others wait at the next step
            if fleet.main:
                with open_append(checkpoint.run_dir / "metrics.jsonl") as f:
                    f.write(json.dumps(last) + "\n")
            emit(last)
            if outcome.stop and number < s.steps:
                log(f"stopped after step {number} of {s.steps}; {kept_by(checkpoint, store)}. "
                    "Run the same command again to resume.")
                raise StoppedBySignal(exit_code(outcome.stop))
    if fleet.main:
        plot_run(checkpoint.run_dir, log)
    log(f"done: {s.steps} steps, last loss {last.get('loss', float('nan')):.4f}, peak RSS "
        f"{format_size(host_peak_rss())}")
    if stop.signum:  # a signal in the last step: the run is complete, its outputs written
        log(f"stopped by {signal_name(stop.signum)} in the last step: the run is complete "
            f"({kept_by(checkpoint, store)})")
        raise StoppedBySignal(exit_code(stop.signum))
    return last
