"""`slowllama bench`: training steps on a random-weight store, each set against the machine's limits.

It builds (or reuses) a random store of a preset's shape, measures the machine (disk, page cache,
pinned copies, matmul peak), runs a few training steps on random tokens and prints, per step, the
time, the throughput, the bytes each tier moved, and the bound: the least time the step could take
given the bytes it moved and the FLOPs it computed (roofline.py), with efficiency = bound / actual.

The steps go through the trainer that finetune's steps go through (train/trainer.py: the same
transaction and commit policy), not through finetune itself: finetune needs a sentencepiece
tokenizer of the model's vocabulary and a text file, which a 32000-token random model does not
have, and the benchmark needs its own hooks around each step (page cache eviction, peak-memory
resets, a device sync before the clock stops).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from slowllama.bench.machine import (copy_bandwidth, machine_kind, matmul_peak, measure_disk, peak_rss, reset_peak_rss,
                                     save_machine, synchronize)
from slowllama.bench.profile import start_profile, write_profile
from slowllama.bench.roofline import (Machine, StepFlops, bound, efficiency, matmul_params, median_after_warmup,
                                      step_flops, tier_seconds)
from slowllama.bench.synthetic import bench_args, open_or_build, random_batches, store_bytes
from slowllama.commands.common import (check_disk_for_steps, check_seq_len, log_kept_graphs, make_engine, resolve_device,
                                       run_budgets)
from slowllama.data.windows import microbatches
from slowllama.engine.fleet import Fleet, start_fleet
from slowllama.engine.residency import DEVICE_ALLOWANCE, host_allowance
from slowllama.errors import SlowllamaError
from slowllama.model.args import dtype_from_name, dtype_name
from slowllama.model.lora import LoRAConfig, LoRAState, init_params, parse_targets
from slowllama.optim.registry import make_optimizer
from slowllama.settings import BenchSettings
from slowllama.sizes import parse_size
from slowllama.store.guards import check_free_space
from slowllama.store.quantized import parse_scheme
from slowllama.store.store import Store
from slowllama.train.checkpoints import NoCheckpoint, StoreCheckpoint
from slowllama.train.trainer import Trainer

GB = 1e9  # bench reports decimal units: bytes moved, bandwidths and memory alike
# per-step figures summarized as medians over the steps after the first
MEDIANS = ("seconds", "tokens_per_second", "model_tflops", "hardware_tflops", "mfu", "read_gbps", "write_gbps",
           "h2d_gbps", "d2h_gbps", "bound_seconds", "efficiency")


def validate(s: BenchSettings) -> None:
    for name in ("steps", "batch_size", "accumulate", "seq_len", "save_every"):
        if getattr(s, name) < 1:
            raise SlowllamaError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(s, name)}")
    if s.lora_rank < 0:
        raise SlowllamaError(f"--lora-rank: must be >= 0, got {s.lora_rank}")
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise SlowllamaError(f"--lr: must be a positive number, got {s.lr}")
    if s.probe_size != "auto" and parse_size(s.probe_size, "--probe-size") < 1:
        raise SlowllamaError(f"--probe-size: must be positive, got {s.probe_size!r}")


def counters(engine, store: Store) -> dict:
    """The cumulative counters of a step's traffic: the store's bytes (SSD or page cache), the pipeline's
    host <-> device copies, and the seconds the compute waited on reads and on writes."""
    pipe = engine.pipe
    return {"bytes_read": store.bytes_read, "bytes_written": store.bytes_written, "h2d_bytes": pipe.h2d_bytes,
            "d2h_bytes": pipe.d2h_bytes, "read_wait": pipe.read_wait, "write_wait": pipe.write_wait}


def lora_state(args, s: BenchSettings, device) -> LoRAState:
    """Fresh adapters (AdamW-trained) on the benchmark's random base."""
    cfg = LoRAConfig(s.lora_rank, 2.0 * s.lora_rank, 0.0, parse_targets(s.lora_targets)).validate()
    return LoRAState(cfg, {k: torch.nn.Parameter(v) for k, v in init_params(args, cfg, s.seed, device).items()})


def probe_bytes(probe_size: str, args, dtype: torch.dtype) -> int:
    """--probe-size; auto: as large as the store (what a step reads), within 64 MiB and 1 GiB."""
    if probe_size == "auto":
        return min(1 << 30, max(64 << 20, store_bytes(args, dtype)))
    return parse_size(probe_size, "--probe-size")


def needed_disk(args, dtype: torch.dtype, build: bool, probe: int) -> int:
    """Free disk to build the store (if it is built) and measure the disk; a step's own needs are
    checked once the engine knows whether it writes every step (as finetune checks them)."""
    return (store_bytes(args, dtype) if build else 0) + probe + (64 << 20)


def measure_machine(folder: Path, device: torch.device, dtype: torch.dtype, probe: int,
                    log: Callable[[str], None]) -> tuple[Machine, dict]:
    """The machine's limits (roofline.Machine) and a JSON-able record of them, with the cache check."""
    disk = measure_disk(str(folder), probe, log)
    log(f"measuring host <-> device copies and the {dtype_name(dtype)} matmul peak on {device.type}")
    h2d, d2h = copy_bandwidth(device)
    peak = matmul_peak(device, dtype)
    machine = Machine(disk_read=disk["disk_read"], disk_write=disk["disk_write"],
                      page_cache_read=disk["page_cache_read"], matmul=peak, h2d=h2d, d2h=d2h)
    record = {"disk_read_gbps": disk["disk_read"] / GB, "disk_write_gbps": disk["disk_write"] / GB,
              "page_cache_read_gbps": disk["page_cache_read"] / GB, "cache_drop_worked": disk["cache_dropped"],
              "resident_after_drop": disk["resident_after_drop"],
              "h2d_gbps": h2d / GB if h2d else None, "d2h_gbps": d2h / GB if d2h else None,
              "matmul_tflops": peak / 1e12, "matmul_dtype": dtype_name(dtype), "device": str(device)}
    log(machine_line(record))
    saved = save_machine(machine_kind(device.type, dtype_name(dtype)), record)  # for `slowllama plan`'s estimates
    if saved is not None:
        log(f"kept the machine's limits in {saved} (slowllama plan reads them)")
    return machine, record


def machine_line(mach: dict) -> str:
    """The machine's measured limits in one line."""
    def maybe(v):
        return "n/a" if v is None else f"{v:.1f} GB/s"

    drop = {True: "yes", False: "NO: the read figure is the page cache's", None: "unknown"}[mach["cache_drop_worked"]]
    return (f"machine: disk write {mach['disk_write_gbps']:.2f} GB/s, disk read {mach['disk_read_gbps']:.2f} GB/s "
            f"(page cache dropped: {drop}), page-cache read {mach['page_cache_read_gbps']:.2f} GB/s, pinned "
            f"host->device {maybe(mach['h2d_gbps'])}, device->host {maybe(mach['d2h_gbps'])}, "
            f"{mach['matmul_dtype']} matmul {mach['matmul_tflops']:.3g} TFLOP/s on {mach['device']}")


def step_report(raw: dict, flops: StepFlops, machine: Machine, cache_dropped: bool) -> dict:
    """A step's measured figures (raw: step, loss, tokens, seconds, byte counts, peak memory) with
    the rates, FLOPs, utilization, per-tier times, bound and efficiency derived from them."""
    sec = raw["seconds"]
    tiers = tier_seconds(raw["bytes_read"], raw["bytes_written"], flops.hardware, machine, cache_dropped,
                         raw.get("h2d_bytes"), raw.get("d2h_bytes"))
    tier, bound_s = bound(tiers)
    rep = {**raw, "tokens_per_second": raw["tokens"] / sec,
           "model_flops": flops.model, "hardware_flops": flops.hardware,
           "model_tflops": flops.model / sec / 1e12, "hardware_tflops": flops.hardware / sec / 1e12,
           "mfu": flops.model / sec / machine.matmul,
           "storage": "ssd" if cache_dropped else "page cache",
           "read_gbps": raw["bytes_read"] / sec / GB, "write_gbps": raw["bytes_written"] / sec / GB}
    for key in ("h2d", "d2h"):
        if f"{key}_bytes" in raw:
            rep[f"{key}_gbps"] = raw[f"{key}_bytes"] / sec / GB
    rep.update(tier_seconds=tiers, bound_tier=tier, bound_seconds=bound_s, efficiency=efficiency(bound_s, sec))
    return rep


def summarize(reports: list[dict], header: dict) -> dict:
    """The final object: the run's settings and machine (header), medians after warm-up, peaks."""
    medians = {k: median_after_warmup([r.get(k) for r in reports]) for k in MEDIANS}
    gpu = [r["peak_gpu_bytes"] for r in reports if r.get("peak_gpu_bytes") is not None]
    return {"summary": True, **header, "steps": len(reports),
            "median_steps": f"2-{len(reports)}" if len(reports) > 1 else "1",
            "median": medians, "bound_tiers": [r["bound_tier"] for r in reports],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in reports),
            "peak_gpu_bytes": max(gpu) if gpu else None}


def _gb(n) -> str:
    """Bytes in decimal units: 812.3 MB, 13.48 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("TB", "GB") else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_step(r: dict, total: int) -> str:
    """One line per step: time, throughput, FLOP rates, bytes per tier, peak memory, bound, efficiency."""
    tier = "SSD" if r["storage"] == "ssd" else "page cache"
    parts = [f"step {r['step']}/{total}: {r['seconds']:.3f} s, {r['tokens_per_second']:.0f} tok/s, "
             f"{r['model_tflops']:.3g} TFLOP/s model (MFU {100 * r['mfu']:.1f}%), "
             f"{r['hardware_tflops']:.3g} TFLOP/s hardware",
             f"{tier}: read {_gb(r['bytes_read'])} ({r['read_gbps']:.2f} GB/s), "
             f"written {_gb(r['bytes_written'])} ({r['write_gbps']:.2f} GB/s)"]
    if r.get("h2d_bytes") or r.get("d2h_bytes"):  # a GPU's copies
        parts.append(f"host->device {_gb(r.get('h2d_bytes', 0))} ({r.get('h2d_gbps', 0):.2f} GB/s), "
                     f"device->host {_gb(r.get('d2h_bytes', 0))} ({r.get('d2h_gbps', 0):.2f} GB/s)")
    mem = f"peak RSS {_gb(r['peak_rss_bytes'])}"
    if r.get("peak_gpu_bytes") is not None:
        mem += f", peak GPU {_gb(r['peak_gpu_bytes'])}"
    if r.get("spill_bytes"):
        parts.append(f"activations spilled {_gb(r['spill_bytes'])}")
    parts.append(mem)
    parts.append(f"waited on reads {r.get('read_wait', 0):.3f} s, on writes {r.get('write_wait', 0):.3f} s")
    parts.append(f"bound {r['bound_seconds']:.3f} s ({r['bound_tier']}), efficiency {100 * r['efficiency']:.1f}%")
    parts.append(f"loss {r['loss']:.4f}")
    return " | ".join(parts)


def format_summary(summary: dict) -> list[str]:
    """Header and median lines of the final summary (text mode)."""
    m, mach = summary["median"], summary["machine"]
    lines = [
        f"model: preset {summary['preset']}, {summary['layers']} layers, {summary['matmul_params'] / 1e9:.3f} B "
        f"matmul weights, {summary['store_dtype']} store of {_gb(summary['store_bytes'])}; "
        f"{summary['tokens_per_step']} tokens/step ({summary['batch_size']} x {summary['accumulate']} x "
        f"{summary['seq_len']}), {summary['optimizer']}, compute {summary['compute_dtype']} on {mach['device']}"
        + (f" x {summary['ranks']} ranks" if summary.get("ranks", 1) > 1 else ""),
        f"FLOPs/step: model {summary['model_flops'] / 1e12:.4g} T (6·N·T + 3·attention), hardware "
        f"{summary['hardware_flops'] / 1e12:.4g} T (8·N_blocks·T + 6·N_head·T + 4·attention where blocks are "
        f"recomputed; {summary.get('blocks_keeping_graphs') or 0} of {summary['layers']} kept their graph)",
        machine_line(mach),
        f"median of steps {summary['median_steps']}: {m['seconds']:.3f} s/step, {m['tokens_per_second']:.0f} tok/s, "
        f"{m['model_tflops']:.3g} TFLOP/s model (MFU {100 * m['mfu']:.1f}% of the measured peak), "
        f"read {m['read_gbps']:.2f} GB/s, written {m['write_gbps']:.2f} GB/s, bound {m['bound_seconds']:.3f} s, "
        f"efficiency {100 * m['efficiency']:.1f}%",
        f"streaming {'each weight of a block' if summary['stream_unit'] == 'weight' else 'whole blocks'}; "
        f"peak RSS {_gb(summary['peak_rss_bytes'])} (--max-memory {_gb(summary['budget_host_bytes'])} + "
        f"{_gb(summary['allowance_host_bytes'])} for the runtime)"
        + (f", peak GPU {_gb(summary['peak_gpu_bytes'])} (--max-gpu-memory {_gb(summary['budget_gpu_bytes'])} + "
           f"{_gb(summary['allowance_gpu_bytes'])})" if summary["peak_gpu_bytes"] is not None else ""),
    ]
    if not summary["drop_cache"]:
        lines.append("note: without --drop-cache the store's reads may come from the page cache: the storage "
                     "figures and the bound count them at page-cache speed, not the SSD's")
    if not summary["counts_host_device"]:
        lines.append("note: the engine does not count host<->device bytes yet: the bound leaves PCIe out")
    return lines


def run_steps(trainer: Trainer, store: Store, s: BenchSettings, args, flops: StepFlops, machine: Machine,
              show: Callable[[dict], None], log: Callable[[str], None]) -> list[dict]:
    """Time s.steps training steps, committed to the store as finetune commits them; returns the reports.

    Steps after the last commit point are rolled back at the end (a benchmark's store keeps its last
    commit): timing the steady state of --save-every N needs no final write of everything.
    Under torchrun each rank takes its share of every step's windows; rank 0's counters are reported."""
    reports = []
    engine = trainer.engine
    fleet = engine.fleet
    first = store.step + 1  # the step being made (no run record: the store's own numbers); it seeds dropout
    prof, profiled = None, 0.0
    for index in range(s.steps):
        if s.profile and index == 1:  # the steps after the warm-up
            prof = start_profile(engine.device)
        batches = random_batches(args, index, s.batch_size, s.accumulate, s.seq_len, s.seed)
        mine, first_micro = fleet.share(s.batch_size * s.accumulate, s.batch_size)
        x, y = (torch.cat([b[i] for b in batches])[mine] for i in (0, 1))
        batches = microbatches(x, y, s.batch_size)
        fleet.barrier()  # every rank starts the clock together
        before = counters(engine, store)
        reset_peak_rss()
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        t0 = time.perf_counter()
        outcome = trainer.step(first + index, batches, s.lr, first_micro)
        synchronize(engine.device)
        fleet.barrier()  # the step is done when every rank is
        seconds = time.perf_counter() - t0
        profiled += seconds if prof is not None else 0.0
        after = counters(engine, store)
        gpu = torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None
        raw = {"step": index + 1, "loss": outcome.result.loss, "tokens": outcome.result.tokens, "seconds": seconds,
               **{k: after[k] - before[k] for k in after if k in before},
               "spill_bytes": outcome.spilled_bytes, "peak_rss_bytes": peak_rss(), "peak_gpu_bytes": gpu}
        report = step_report(raw, flops, machine, s.drop_cache)
        reports.append(report)
        show(report)
    if prof is not None and fleet.main:
        log(write_profile(prof, Path(s.profile), s.steps - 1, profiled, engine.device))
    elif prof is not None:
        prof.stop()
    trainer.abandon()
    return reports


def run(s: BenchSettings, log: Callable[[str], None]) -> None:
    bench(s, log)


def bench(s: BenchSettings, log: Callable[[str], None], out: Callable[[str], None] = print) -> dict:
    """Run the benchmark of settings s; prints per-step lines (or JSON objects) and the summary; returns it."""
    validate(s)
    fleet = start_fleet(s.device, "auto", log)
    summary = _bench(s, fleet, log if fleet.main else (lambda m: None), out if fleet.main else (lambda m: None))
    fleet.close()  # not after an error: with NCCL it can wait forever for the ranks that stopped
    return summary


def _bench(s: BenchSettings, fleet: Fleet, log: Callable[[str], None], out: Callable[[str], None]) -> dict:
    args = bench_args(s.preset, s.layers)
    check_seq_len(s.seq_len, args)
    device, compute_dtype = resolve_device(s)
    dtype = dtype_from_name(s.dtype, "--dtype")
    quantization = parse_scheme(s.quantize, s.double_quant)
    if quantization is not None and not s.lora_rank:
        raise SlowllamaError(f"--quantize {s.quantize}: a quantized base trains LoRA adapters only (add --lora-rank)")
    probe = probe_bytes(s.probe_size, args, dtype)
    temp = None
    if s.store_dir:
        path = Path(s.store_dir)
    elif not fleet.main:
        path = None  # rank 0's, below
    else:
        try:
            temp = Path(tempfile.mkdtemp(prefix=".slowllama-bench-", dir=os.getcwd()))
        except OSError as e:
            raise SlowllamaError(f"{os.getcwd()}: cannot make the temporary store folder here ({e.strerror}); "
                                 "use --store-dir") from None
        path = temp / "store"
    try:
        if fleet.main:
            check_free_space(path.parent, needed_disk(args, dtype, not path.exists(), probe),
                             f"{path} (--layers cuts the model)")
            path, _ = open_or_build(path, args, dtype, s.seed, s.preset, log, quantization, device.type)
            machine, machine_record = measure_machine(path, device, compute_dtype, probe, log)
        # the other ranks take rank 0's store and machine; the FLOPs of a step spread over every rank's GPU
        path, machine, machine_record = fleet.broadcast_object((path, machine, machine_record) if fleet.main else None)
        if fleet.active:
            machine = dataclasses.replace(machine, matmul=machine.matmul * fleet.world)
            machine_record = {**machine_record, "ranks": fleet.world}
        with (Store.open(path, writable=True, log=log) if fleet.main
              else Store.open(path, follower=True, co_writer=not s.lora_rank)) as store:
            store.drop_cache = s.drop_cache
            optimizer = make_optimizer("adamw" if s.lora_rank else s.optimizer,
                                       state_dtype=dtype_from_name(s.optim_dtype, "--optim-dtype"))
            lora = lora_state(args, s, device) if s.lora_rank else None
            batch_size, micro = fleet.rank_batch(s.batch_size, s.accumulate)
            host_budget, gpu_budget = run_budgets(s, device)
            engine = make_engine(store, s, optimizer=optimizer, lora=lora, seed=s.seed, train=True,
                                 stochastic_rounding=dtype == torch.bfloat16 and s.rounding != "nearest",
                                 batch_size=batch_size, seq_len=s.seq_len, microbatches=micro, lookahead=2 if s.prefetch else 0,
                                 write_queue=2 if s.async_writes else 0, fleet=fleet, compile=s.compile,
                                 keep_graphs=s.recompute == "auto", log=log)
            if engine.compile_note:
                log(engine.compile_note)
            kept = log_kept_graphs(engine, batch_size, s.seq_len, micro, log)
            if fleet.active:
                log(engine.choose_replication())
            checkpoint = StoreCheckpoint(store, fleet) if lora is None else NoCheckpoint()
            trainer = Trainer(engine, checkpoint, save_every=s.save_every, log=log)  # commits as finetune does
            if lora is None and trainer.commit_every <= s.steps and fleet.main:
                check_disk_for_steps(store, engine, s.batch_size * s.accumulate, s.seq_len)
            flops = step_flops(args, s.batch_size * s.accumulate, s.seq_len, args.n_layers - kept)
            if s.drop_cache and fleet.main:
                store.evict_from_page_cache()  # the store was just written or read: start from the disk
            show = (lambda r: out(json.dumps(r))) if s.json else (lambda r: out(format_step(r, s.steps)))
            log(f"timing {s.steps} steps")
            reports = run_steps(trainer, store, s, args, flops, machine, show, log)
            engine.pipe.close()
            header = {"preset": s.preset, "layers": args.n_layers, "model": args.to_dict(),
                      "matmul_params": matmul_params(args)["total"], "store_bytes": store_bytes(args, dtype),
                      "store_dtype": s.dtype, "compute_dtype": dtype_name(compute_dtype),
                      "optimizer": "adamw" if s.lora_rank else s.optimizer, "ranks": fleet.world,
                      "quantize": s.quantize, "double_quant": s.double_quant,
                      "batch_size": s.batch_size, "accumulate": s.accumulate, "seq_len": s.seq_len,
                      "prefetch": s.prefetch, "async_writes": s.async_writes, "compile": s.compile,
                      "blocks_compiled": engine.compiled_blocks is not None, "blocks_keeping_graphs": kept,
                      "tokens_per_step": s.batch_size * s.accumulate * s.seq_len,
                      "model_flops": flops.model, "hardware_flops": flops.hardware, "drop_cache": s.drop_cache,
                      "counts_host_device": True, "machine": machine_record, "stream_unit": engine.cfg.unit,
                      "read_ahead": engine.cfg.lookahead, "writes_in_flight": engine.cfg.write_queue,
                      "budget_host_bytes": host_budget, "budget_gpu_bytes": gpu_budget or None,
                      "allowance_host_bytes": host_allowance(device.type),
                      "allowance_gpu_bytes": DEVICE_ALLOWANCE if device.type == "cuda" else None}
            summary = summarize(reports, header)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    if s.json:
        out(json.dumps(summary))
    else:
        for line in format_summary(summary):
            out(line)
    return summary
