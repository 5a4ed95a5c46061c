"""The commands that run the model: eval, and finetune's run (steps, eval, logging, progress, resume)."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable, Optional

import torch
from tqdm import tqdm

from slowllama.blackbox_model import EngineConfig, OffloadedModel
from slowllama.data import TokenData, count_windows, eval_batches, load_data, microbatches, step_windows
from slowllama.errors import SlowllamaError
from slowllama.generate import generate
from slowllama.memory import Activations, format_size, host_peak_rss, parse_size, physical_memory
from slowllama.optim import SCHEDULES, clip_coefficient, lr_at, make_optimizer
from slowllama.settings import EvalSettings, FinetuneSettings, resolve_device
from slowllama.store import Store
from slowllama.tokenizer import load_tokenizer

# settings that define a run: changing them on resume changes the result, so it is reported
RUN_KEYS = ("data", "batch_size", "accumulate", "seq_len", "lr", "optimizer", "adam_betas", "adam_eps",
            "weight_decay", "optim_dtype", "lr_schedule", "warmup_steps", "grad_clip", "clip_norm", "dropout",
            "seed", "order", "steps", "master_weights", "rounding")


def make_engine(store: Store, settings, optimizer=None, **config) -> OffloadedModel:
    """The offloaded model with the device, dtype and memory budget of a command's settings."""
    device, dtype = resolve_device(settings)
    limit = physical_memory() // 2 if settings.max_memory == "auto" else parse_size(settings.max_memory, "--max-memory")
    if limit <= 0:
        raise SlowllamaError(f"--max-memory: must be positive, got {settings.max_memory!r}")
    cfg = EngineConfig(device=device, compute_dtype=dtype, budget_bytes=limit, **config)
    return OffloadedModel(store, cfg, optimizer=optimizer)


def evaluate(engine: OffloadedModel, data: TokenData, seq_len: int, batch_size: int,
             progress: bool = True) -> dict:
    """eval_loss: mean token cross-entropy over all targets of eval's windows; eval_ppl = exp(eval_loss)."""
    n_windows = count_windows(data, seq_len)
    total, count = 0.0, 0
    batches = list(eval_batches(data, seq_len, batch_size))
    # several batches share one pass over the modules, as many as their activations fit the budget
    per_batch = batch_size * seq_len * engine.args.dim * 4 * 2
    group = max(1, min(len(batches), engine.budget.free // max(per_batch, 1)))
    with tqdm(total=n_windows, desc="eval", unit="win", disable=None if progress else True, leave=False) as bar:
        for first in range(0, len(batches), group):
            part = batches[first:first + group]
            s, c = engine.loss_sum(part)
            total, count = total + s, count + c
            bar.update(sum(x.shape[0] for x, _ in part))
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "tokens": count}


def check_seq_len(seq_len: int, engine_or_args) -> None:
    args = getattr(engine_or_args, "args", engine_or_args)
    if seq_len < 1:
        raise SlowllamaError(f"--seq-len: must be at least 1, got {seq_len}")
    if seq_len > args.max_seq_len:
        raise SlowllamaError(f"--seq-len: {seq_len} is above the model's max_seq_len {args.max_seq_len}")


def run_eval(s: EvalSettings, log: Callable[[str], None]) -> dict:
    if not s.data:
        raise SlowllamaError("--data: required (a .txt file)")
    if s.batch_size < 1:
        raise SlowllamaError(f"--batch-size: must be at least 1, got {s.batch_size}")
    store = Store.open(s.store)
    check_seq_len(s.seq_len, store.args)
    tokenizer = load_tokenizer(store.path)
    data = load_data(s.data, tokenizer)
    count_windows(data, s.seq_len)
    engine = make_engine(store, s)
    return evaluate(engine, data, s.seq_len, s.batch_size)


def validate_finetune(s: FinetuneSettings) -> None:
    if not s.data:
        raise SlowllamaError("--data: required (a .txt file)")
    for name in ("steps", "batch_size", "accumulate", "seq_len"):
        if getattr(s, name) < 1:
            raise SlowllamaError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(s, name)}")
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise SlowllamaError(f"--lr: must be a positive number, got {s.lr}")
    if not 0.0 <= s.dropout < 1.0:
        raise SlowllamaError(f"--dropout: must be in [0, 1), got {s.dropout}")
    if s.log_every < 0:
        raise SlowllamaError(f"--log-every: must be >= 0, got {s.log_every}")
    if s.eval_every < 0:
        raise SlowllamaError(f"--eval-every: must be >= 0, got {s.eval_every}")
    if s.completion_tokens < 0:
        raise SlowllamaError(f"--completion-tokens: must be >= 0, got {s.completion_tokens}")
    if s.warmup_steps < 0:
        raise SlowllamaError(f"--warmup-steps: must be >= 0, got {s.warmup_steps}")
    if not (math.isfinite(s.grad_clip) and s.grad_clip >= 0):
        raise SlowllamaError(f"--grad-clip: must be >= 0, got {s.grad_clip}")
    if s.optimizer == "sgd" and s.weight_decay:
        raise SlowllamaError("--weight-decay: applies to --optimizer adamw (SGD here has no weight decay)")
    if s.lr_schedule not in SCHEDULES:
        raise SlowllamaError(f"--lr-schedule: unknown schedule {s.lr_schedule!r}")


class StopNow(KeyboardInterrupt):
    def __init__(self, code: int):
        super().__init__()
        self.code = code


class StopRequest:
    """SIGINT / SIGTERM: finish the step in progress, then stop with 130 / 143; a second one stops at once."""

    def __init__(self, log: Callable[[str], None] = print):
        self.signum: Optional[int] = None
        self.log = log

    def __call__(self, signum, frame):
        code = 130 if signum == signal.SIGINT else 143
        if self.signum is not None:  # the second: stop now, rolling the step in progress back
            raise StopNow(code)
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: stopping once the step in progress is committed "
                 "(send it again to stop at once, losing that step)")

    @contextmanager
    def installed(self):
        old = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class StoppedBySignal(SystemExit):
    pass


def start_or_resume_run(store: Store, s: FinetuneSettings, log) -> dict:
    """The run record in the manifest: where it started and the settings that define it."""
    run = store.manifest.get("run")
    wanted = {k: getattr(s, k) for k in RUN_KEYS}
    if run is None or s.new_run:  # recorded by the first step's commit
        return {"start_step": store.step, "settings": wanted}
    changed = [f"{k} {run['settings'].get(k)!r} -> {wanted[k]!r}" for k in RUN_KEYS
               if k != "steps" and run["settings"].get(k) != wanted[k]]
    if changed:
        log("resuming with changed settings (the result will differ from an uninterrupted run): " + ", ".join(changed))
    run = {**run, "settings": wanted}
    return run


def check_disk_for_steps(store: Store, s: FinetuneSettings, engine: OffloadedModel, optimizer, master: bool) -> None:
    """Refuse to start when the disk cannot hold one step's new files and spilled activations."""
    elsize = torch.empty((), dtype=engine.cfg.compute_dtype).element_size()
    acts = store.args.n_layers * s.batch_size * s.accumulate * s.seq_len * store.args.dim * elsize
    resident = sum(int(info["bytes"]) for info in store.manifest["files"]["modules"].values())  # cached modules
    spill = min(acts, max(0, acts + resident - engine.budget.limit))
    state = getattr(optimizer, "state_dtype", torch.float32)
    store.check_step_space(2 * state.itemsize if optimizer.stateful else 0,
                           4 if master and store.dtype != torch.float32 else 0, spill)


def finetune(s: FinetuneSettings, log: Callable[[str], None], emit: Callable[[dict], None]) -> dict:
    """Full fine-tuning of the store in place; returns a summary. emit() receives each step's metrics."""
    validate_finetune(s)
    store = Store.open(s.store, writable=True, log=log)
    try:
        return _finetune(store, s, log, emit)
    except KeyboardInterrupt as e:  # a second Ctrl-C: the step in progress was rolled back
        log(f"interrupted: the store is at step {store.step}, committed; run the same command again to resume")
        raise StoppedBySignal(getattr(e, "code", 130)) from None
    finally:
        store.close()


def _finetune(store: Store, s: FinetuneSettings, log, emit) -> dict:
    check_seq_len(s.seq_len, store.args)
    tokenizer = load_tokenizer(store.path)
    data = load_data(s.data, tokenizer)
    if s.order == "sequential" or len(data) < s.seq_len + 1:
        count_windows(data, s.seq_len)
    val = load_data(s.val_data, tokenizer) if s.val_data else None
    if val is not None:
        count_windows(val, s.seq_len)
    run = start_or_resume_run(store, s, log)
    done = store.step - run["start_step"]
    if done >= s.steps:
        log(f"{store.path}: the run has already finished {done} of {s.steps} steps; nothing to do")
        return {"steps_done": done, "nothing_to_do": True}
    optimizer = make_optimizer(s)
    master = s.master_weights == "fp32" or any(store.manifest["files"].get("master", {}))
    if master and s.master_weights != "fp32":
        log(f"{store.path}: using the fp32 master weights the store already has")
    stochastic = s.rounding == "stochastic" or (s.rounding == "auto" and not master)
    engine = make_engine(store, s, optimizer=optimizer, dropout=s.dropout, seed=s.seed, master_weights=master,
                         stochastic_rounding=stochastic)
    check_disk_for_steps(store, s, engine, optimizer, master)
    (store.run_dir / "settings.json").write_text(json.dumps({"settings": asdict(s), "start_step": run["start_step"],
                                                             "resumed_at": done}, indent=1) + "\n")
    if done:
        log(f"resuming the run at step {done} of {s.steps}")

    def eval_and_show(step: int) -> dict:
        out = {}
        if val is not None:
            out = evaluate(engine, val, s.seq_len, s.batch_size, progress=False)
            log(f"step {step}: eval loss {out['eval_loss']:.4f}, ppl {out['eval_ppl']:.2f}")
        if s.prompt:
            text = generate(engine, tokenizer, s.prompt, s.completion_tokens)
            log(f"step {step}: {json.dumps(s.prompt + text, ensure_ascii=False)}")
        return out

    stop = StopRequest(log)
    last = {}
    metrics_path = store.run_dir / "metrics.jsonl"
    with stop.installed(), tqdm(total=s.steps, initial=done, desc="finetune", unit="step", disable=None) as bar:
        for index in range(done, s.steps):
            number = index + 1  # 1-based step of the run
            inputs, targets = step_windows(data, index, s.batch_size * s.accumulate, s.seq_len, s.order, s.seed)
            batches = microbatches(inputs, targets, s.batch_size)
            read0, written0, t0 = store.bytes_read, store.bytes_written, time.perf_counter()
            if engine.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(engine.device)
            acts = Activations(engine.budget, store.scratch, engine.device)
            lr = lr_at(number, s.steps, s.lr, s.lr_schedule, s.warmup_steps)
            store.begin_step(store.step + 1)
            try:
                coef = 1.0
                if s.grad_clip:
                    norm = run.get("grad_norm")
                    if s.clip_norm == "exact" or norm is None:  # norm pass: the gradient, no update
                        norm = engine.train_step(number, batches, lr, acts, update=False).grad_norm
                    coef = clip_coefficient(norm, s.grad_clip)
                result = engine.train_step(number, batches, lr, acts, clip_coef=coef)
                run = {**run, "grad_norm": result.grad_norm}
                store.commit(store.step + 1, {"run": run})
            except BaseException:
                engine.discard_step()
                store.rollback()
                raise
            finally:
                acts.clear()
            seconds = time.perf_counter() - t0
            last = {"step": number, "loss": result.loss, "tokens": result.tokens, "seconds": seconds,
                    "tokens_per_second": result.tokens / seconds, "lr": lr, "grad_norm": result.grad_norm,
                    "bytes_read": store.bytes_read - read0, "bytes_written": store.bytes_written - written0,
                    "peak_rss_bytes": host_peak_rss()}
            if engine.device.type == "cuda":
                last["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(engine.device)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            emit(last)
            bar.set_postfix_str(f"loss {result.loss:.4f}, {last['tokens_per_second']:.0f} tok/s, {seconds:.2f} s/step")
            bar.update(1)
            if s.log_every and number % s.log_every == 0:
                log(f"step {number}: loss {result.loss:.4f}, lr {lr:.3g}, {last['tokens_per_second']:.0f} tok/s, "
                    f"{seconds:.2f} s/step, read {format_size(last['bytes_read'])}, "
                    f"written {format_size(last['bytes_written'])}")
            if s.eval_every and number % s.eval_every == 0 and number < s.steps:
                last.update(eval_and_show(number))
            if stop.signum is not None:
                code = 130 if stop.signum == signal.SIGINT else 143
                log(f"stopped after step {number} of {s.steps}; the store is committed. "
                    "Run the same command again to resume.")
                raise StoppedBySignal(code)
    last.update(eval_and_show(s.steps))
    log(f"done: {s.steps} steps, last loss {last.get('loss', float('nan')):.4f}, peak RSS "
        f"{format_size(host_peak_rss())}")
    return last
