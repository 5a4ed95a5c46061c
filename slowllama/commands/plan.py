"""`slowllama plan`: will it fit? The budgets, disk, traffic and time of a training step, without running one.

Nothing is read but the model's description (a store's manifest, params.json, config.json, or a preset), and
nothing runs on the device. The memory a step needs comes from the functions a run's engine uses
(commands/common.step_needs, residency.choose_need, minimum_budgets, split_budgets), so the minimum printed is
the budget at which `slowllama finetune` starts, and a byte less is refused. The bytes moved per step are the
pipeline's residency replayed on the step's plan of use (engine/traffic.py); the time, where `slowllama bench`
has measured this machine, is the roofline bound of those bytes and the step's FLOPs (bench/roofline.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from slowllama.bench.machine import load_machines, machine_cache_path, machine_kind
from slowllama.bench.roofline import Machine, bound, step_flops, tier_seconds
from slowllama.commands.common import budget_setting, check_seq_len, default_host_budget, device_memory, step_needs
from slowllama.engine.residency import Need, choose_need, fits_in_memory, is_unified, minimum_budgets, split_budgets
from slowllama.engine.traffic import step_traffic
from slowllama.errors import SlowllamaError
from slowllama.formats.dtypes import resolve_store_dtype
from slowllama.formats.hf import WEIGHT_DTYPES, read_layouts, shard_names
from slowllama.formats.hf_names import args_from_config
from slowllama.formats.meta import load_shard, read_meta_params, shard_files
from slowllama.jsonfile import read_json
from slowllama.model.args import ModelArgs, dtype_from_name, dtype_name
from slowllama.model.families import PRESETS, preset_args
from slowllama.model.lora import LoRAConfig, parse_targets
from slowllama.model.shapes import linear_shape, model_param_count, module_names
from slowllama.model.tokenizer import load_tokenizer
from slowllama.optim.base import Optimizer
from slowllama.optim.registry import make_optimizer
from slowllama.settings import PlanSettings
from slowllama.sizes import format_size
from slowllama.store.manifest import MANIFEST, Manifest
from slowllama.store.quantized import Quantization, parse_scheme, weight_bytes
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS

GB = 1e9  # bench's records are in decimal GB/s
# how a run streams, in the order choose_need tries them: (unit, reads ahead, writes in flight)
RUNGS = (("block", 2, 2), ("weight", 2, 2), ("weight", 1, 1))
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PlannedModel:
    """What plan knows of a model: its shapes, the store's dtype, and a store's own file sizes where it is one."""

    args: ModelArgs
    dtype: torch.dtype
    kind: str  # "store", "meta", "hf" or "preset"
    where: str
    module_bytes: Optional[dict[str, int]] = None  # a store's module files (None: from the shapes)
    part_elements: int = DEFAULT_PART_ELEMENTS
    has_master: bool = False  # the store keeps fp32 master weights already (a run then uses them)
    notes: tuple[str, ...] = ()
    quant: Optional[Quantization] = None  # a quantized store's (its blocks' files are smaller; LoRA only)

    def modules_bytes(self) -> int:
        if self.module_bytes is not None:
            return sum(self.module_bytes.values())
        return sum(weight_bytes(self.args, name, None, self.dtype, self.quant) for name in module_names(self.args))


@dataclass(frozen=True)
class Row:
    """One way to train: full fine-tuning with an optimizer, or LoRA (adapters trained with AdamW)."""

    name: str
    optimizer: Optimizer
    lora: bool
    master: bool  # what a run passes as master_weights


def run(s: PlanSettings, log: Callable[[str], None]) -> None:
    result = plan(s)
    print(json.dumps(result) if s.json else "\n".join(format_plan(result)))


# ---- the model ---------------------------------------------------------------------------------------

def read_model(s: PlanSettings) -> PlannedModel:
    """The model of MODEL_OR_STORE: a store, a Meta or Hugging Face folder, or a preset name."""
    path = Path(s.model)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            manifest = Manifest.read(path)
            files = manifest.files.get("modules", {})
            model = PlannedModel(manifest.args, dtype_from_name(manifest.dtype), "store", str(path),
                                 {n: files[n].bytes for n in module_names(manifest.args) if n in files},
                                 manifest.state_part_elements or DEFAULT_PART_ELEMENTS,
                                 bool(manifest.files.get("master")), quant=manifest.quantization)
        elif (path / "params.json").is_file():
            model = _meta_model(path)
        elif (path / "config.json").is_file():
            model = _hf_model(path)
        else:
            raise SlowllamaError(f"{path}: not a model (no {MANIFEST} of a store, params.json of a Meta folder or "
                                 "config.json of a Hugging Face folder)")
    elif path.exists():
        raise SlowllamaError(f"{path}: not a folder (expected a store, a Meta or Hugging Face folder, or a preset)")
    elif s.model in PRESETS:
        model = PlannedModel(preset_args(s.model), torch.bfloat16, "preset", s.model)
    else:
        raise SlowllamaError(f"{s.model}: no such folder, and not a preset (presets: {', '.join(PRESETS)})")
    if s.dtype is not None:
        dtype = resolve_store_dtype(s.dtype, model.dtype, model.where)
        if dtype != model.dtype:  # the store's own file sizes no longer apply
            model = dataclasses.replace(model, dtype=dtype, module_bytes=None)
    quant = parse_scheme(s.quantize, s.double_quant)
    if quant is not None and quant != model.quant:  # (a store's own file sizes no longer apply)
        model = dataclasses.replace(model, quant=quant, module_bytes=None)
    if s.layers is not None:
        if s.layers < 1:
            raise SlowllamaError(f"--layers: must be at least 1, got {s.layers}")
        if s.layers != model.args.n_layers:
            model = dataclasses.replace(model, args=dataclasses.replace(model.args, n_layers=s.layers),
                                        module_bytes=None)
    return model


def _hf_model(path: Path) -> PlannedModel:
    """A Hugging Face folder: config.json's shapes; the embeddings' dtype in the safetensors headers where the
    weights are there (as prepare takes it), else config.json's torch_dtype, else bf16."""
    config = read_json(path / "config.json")
    args, notes = args_from_config(config, str(path / "config.json"))
    named = config.get("torch_dtype") or config.get("dtype")  # transformers' name for it, old and new
    dtype = HF_DTYPES.get(named, torch.bfloat16) if isinstance(named, str) else torch.bfloat16
    try:
        layouts = read_layouts(path, *shard_names(path))  # headers only
    except SlowllamaError:  # not downloaded yet (or in part)
        layouts = []
    for layout in layouts:
        for key, name, _ in layout["keys"]:
            if key == "model.embed_tokens.weight" and name in WEIGHT_DTYPES:
                dtype = WEIGHT_DTYPES[name]
    return PlannedModel(args, dtype, "hf", str(path), notes=tuple(notes))


def _meta_model(path: Path) -> PlannedModel:
    """A Meta folder: params.json's shapes; the dtype of its first shard where it is there (only the shard's
    index is read: the tensors are mapped, not loaded), else bf16 as Meta releases them."""
    _, args = read_meta_params(path)
    notes = []
    if args.vocab_size == -1:  # Meta's params.json leaves it to the tokenizer
        if not (path / "tokenizer.model").is_file():
            raise SlowllamaError(f"{path}/params.json: vocab_size is -1 and there is no tokenizer.model to take it "
                                 "from")
        args = dataclasses.replace(args, vocab_size=load_tokenizer(path).vocab_size)
    dtype = torch.bfloat16
    try:
        shards = shard_files(path)
    except SlowllamaError:
        shards = []
        notes.append(f"{path}: no shards yet: planned for a bf16 store (--dtype to change)")
    if shards:
        emb = load_shard(shards[0]).get("tok_embeddings.weight")
        if emb is not None:
            dtype = emb.dtype
    return PlannedModel(args, dtype, "meta", str(path), notes=tuple(notes))


# ---- the device and the budgets ----------------------------------------------------------------------

def plan_device(s: PlanSettings) -> tuple[str, torch.dtype]:
    """The device type planned for and the compute dtype; nothing needs to be there."""
    name = s.device
    if name == "auto":
        if s.unified:
            name = "mps"
        elif torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if s.unified and name == "cuda":
        raise SlowllamaError("--unified: a cuda GPU has memory of its own; plan unified memory with --device mps "
                             "(or without --device)")
    if is_unified(name) and s.gpu_memory is not None:
        if name == "cpu":
            raise SlowllamaError("--gpu-memory: the cpu has no memory apart from the host's: its budget is --memory")
        raise SlowllamaError("--gpu-memory: on unified memory (mps) one budget covers host and GPU: give the whole "
                             "of it as --memory")
    dtype = dtype_from_name(s.compute_dtype or {"cpu": "fp32", "cuda": "bf16", "mps": "fp16"}[name],
                            "--compute-dtype")
    if name == "mps" and dtype == torch.bfloat16:
        raise SlowllamaError("--compute-dtype bf16: not supported on mps (use fp16 or fp32)")
    return name, dtype


def plan_budgets(s: PlanSettings, device_type: str) -> Optional[tuple[int, int]]:
    """(--max-memory, --max-gpu-memory) to check, as a run would take them (gpu 0 on unified memory); None when
    neither is given. On cuda the one not given defaults as a run's does, on this machine."""
    if s.memory is None and s.gpu_memory is None:
        return None
    if is_unified(device_type):
        return budget_setting(s.memory, "--memory", default_host_budget(device_type)), 0
    host = budget_setting(s.memory, "--memory", default_host_budget(device_type))
    auto = s.gpu_memory in (None, "auto")
    if auto and not torch.cuda.is_available():
        raise SlowllamaError("--gpu-memory: needed with --memory on cuda (this machine has no GPU to take its "
                             "default from, 90% of the GPU's memory)")
    gpu = budget_setting(s.gpu_memory, "--gpu-memory", device_memory(torch.device("cuda")) if auto else 0)
    return host, gpu


# ---- one row -----------------------------------------------------------------------------------------

def unit_text(need: Need) -> str:
    if need.unit == "block":
        return "whole blocks"
    if need.lookahead <= 1 and need.write_queue <= 1:
        return "each weight, 1 read ahead, 1 write in flight"
    return "each weight"


def minimum(device_type: str, needs: Callable[[str, int, int], Need]) -> tuple[int, int]:
    """The smallest budgets a run accepts: the least of the rungs' minimums (choose_need takes the first rung
    that fits, and refuses with the last's, which is the least unless a block is no larger than a weight's
    working set, as in a model whose embeddings are its largest module)."""
    return min((minimum_budgets(device_type, needs(*rung)) for rung in RUNGS), key=lambda b: (b[0] + b[1], b[1]))


def plan_row(model: PlannedModel, row: Row, s: PlanSettings, device_type: str, compute: torch.dtype,
             budgets: Optional[tuple[int, int]], machine: Optional[Machine]) -> dict:
    """What one way to train needs and does: minimum budgets, whether the given ones fit and how it streams,
    disk, bytes per step, and the step's time bound where the machine is measured."""
    args = model.args
    needs = step_needs(args, model.dtype, compute, device_type, train=True, optimizer=row.optimizer,
                       master=row.master, lora=row.lora, batch_size=s.batch_size, seq_len=s.seq_len,
                       microbatches=s.accumulate, part_elements=model.part_elements, quant=model.quant)
    lo_host, lo_gpu = minimum(device_type, needs)
    at_min = choose_need("auto", device_type, lo_host, lo_gpu, 2, 2, needs)
    out = {"name": row.name, "optimizer": row.optimizer.name, "lora": row.lora,
           "min_memory": lo_host, "min_gpu_memory": None if is_unified(device_type) else lo_gpu,
           "unit_at_minimum": unit_text(at_min), "fits": None, "refused": None,
           "units": [{"unit": unit_text(needs(*rung)), **dict(zip(("min_memory", "min_gpu_memory"),
                                                                   minimum_budgets(device_type, needs(*rung))))}
                     for rung in RUNGS]}
    need, split = at_min, split_budgets(device_type, lo_host, lo_gpu, at_min)
    if budgets is not None:
        chosen = choose_need("auto", device_type, budgets[0], budgets[1], 2, 2, needs)
        try:
            split = split_budgets(device_type, budgets[0], budgets[1], chosen)
            need = chosen
            out.update(fits=True, unit=unit_text(chosen))
        except SlowllamaError as e:  # the run's own refusal, naming the minimum
            out.update(fits=False, refused=str(e))
    # the engine's effective master weights: of a 16-bit store, full fine-tuning only
    master = row.master and model.dtype != torch.float32 and not row.lora
    stateful = row.optimizer if row.optimizer.stateful and not row.lora else None
    params = model_param_count(args)["total"]
    room = split.device + (split.host if device_type != "cpu" else 0)
    resident = not row.lora and fits_in_memory(model.modules_bytes(), params, stateful, master, room)
    traffic = step_traffic(args, model.dtype, device_type, split, unit=need.unit, microbatches=s.accumulate,
                           optimizer=stateful, master=master, lora=row.lora, deferred=resident,
                           activations=need.activations, part_elements=model.part_elements, quant=model.quant)
    out.update(at="budgets" if out["fits"] else "minimum", resident=resident, bytes_read=traffic.read,
               bytes_written=traffic.written, spilled_bytes=traffic.spilled,
               h2d_bytes=traffic.h2d if device_type == "cuda" else None,
               d2h_bytes=traffic.d2h if device_type == "cuda" else None)
    out["disk"] = disk(model, row, stateful, master, traffic.spilled, s)
    out.update(estimate_seconds=None, bound_tier=None, tier_seconds=None)
    if machine is not None:
        flops = step_flops(args, s.batch_size * s.accumulate, s.seq_len)
        tiers = tier_seconds(traffic.read, traffic.written, flops.hardware, machine, True, out["h2d_bytes"],
                             out["d2h_bytes"])
        out["bound_tier"], out["estimate_seconds"] = bound(tiers)
        out["tier_seconds"] = tiers
    return out


def disk(model: PlannedModel, row: Row, stateful: Optional[Optimizer], master: bool, spilled: int,
         s: PlanSettings) -> dict:
    """Disk of a row: the store, the state it keeps beside it, and the free space a step needs (as
    Store.check_step_space counts it: new module files, state and master weights beside the committed ones,
    spilled activations; LoRA: the activations only), and the adapter folder of LoRA."""
    modules = model.modules_bytes()
    weights = modules // model.dtype.itemsize
    state = weights * (stateful.state_bytes_per_weight if stateful is not None else 0)
    master_bytes = weights * 4 if master else 0
    if row.lora:
        step = spilled
        adapters = lora_params(model.args, s) * (4 + row.optimizer.state_bytes_per_weight)  # fp32 + AdamW's
    else:
        step = modules + state + master_bytes + spilled + (1 << 20)
        adapters = 0
    return {"store": modules, "optimizer_state": state, "master_weights": master_bytes, "adapters": adapters,
            "step_free": step, "total": modules + state + master_bytes + adapters + step}


def lora_params(args: ModelArgs, s: PlanSettings) -> int:
    """Weights of LoRA's adapters: rank x (in + out) for each adapted linear of every block."""
    return args.n_layers * sum(s.lora_rank * sum(linear_shape(args, t)) for t in parse_targets(s.lora_targets))


# ---- the whole plan ----------------------------------------------------------------------------------

def validate(s: PlanSettings) -> None:
    for name in ("batch_size", "seq_len", "accumulate", "lora_rank"):
        if getattr(s, name) < 1:
            raise SlowllamaError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(s, name)}")
    LoRAConfig(s.lora_rank, 2.0 * s.lora_rank, 0.0, parse_targets(s.lora_targets)).validate()


def cached_machine(device_type: str, compute: torch.dtype) -> tuple[Optional[Machine], Optional[dict]]:
    """bench's measurements of this machine for the device and compute dtype, if it made them."""
    record = load_machines().get(machine_kind(device_type, dtype_name(compute)))
    try:
        machine = Machine(disk_read=record["disk_read_gbps"] * GB, disk_write=record["disk_write_gbps"] * GB,
                          page_cache_read=record["page_cache_read_gbps"] * GB,
                          matmul=record["matmul_tflops"] * 1e12,
                          h2d=record["h2d_gbps"] * GB if record.get("h2d_gbps") else None,
                          d2h=record["d2h_gbps"] * GB if record.get("d2h_gbps") else None)
    except (TypeError, KeyError):  # none, or a record this version cannot read: measured again by bench
        return None, None
    return machine, record


def plan(s: PlanSettings) -> dict:
    """The plan of settings s as one JSON-able object (format_plan prints it)."""
    validate(s)
    model = read_model(s)
    check_seq_len(s.seq_len, model.args)
    device_type, compute = plan_device(s)
    budgets = plan_budgets(s, device_type)
    master = s.master_weights == "fp32" or model.has_master
    names = ["sgd", "adamw"] + ([s.optimizer] if s.optimizer and s.optimizer not in ("sgd", "adamw") else [])
    rows = [Row(n, make_optimizer(n), False, master) for n in names] if model.quant is None else []
    rows.append(Row("lora", make_optimizer("adamw"), True, model.has_master))  # as finetune passes them
    machine, record = cached_machine(device_type, compute)
    planned = [plan_row(model, row, s, device_type, compute, budgets, machine) for row in rows]
    if budgets is not None and not any(r["fits"] for r in planned):
        raise SlowllamaError(nothing_fits(planned, budgets, device_type))
    counts = model_param_count(model.args)
    notes = list(model.notes)
    if model.quant is not None:
        notes.append(f"{model.quant.scheme} store: a read-only base, LoRA only (full fine-tuning is refused)")
    if record is None:
        notes.append(f"no time estimate: `slowllama bench --device {device_type}` measures this machine's disk, "
                     f"copies and {dtype_name(compute)} matmul peak (kept in {machine_cache_path()})")
    return {"model": {"where": model.where, "kind": model.kind, "layers": model.args.n_layers,
                      "parameters": counts["total"], "store_dtype": dtype_name(model.dtype),
                      "store_bytes": model.modules_bytes(), "args": model.args.to_dict()},
            "device": device_type, "unified": is_unified(device_type), "compute_dtype": dtype_name(compute),
            "batch_size": s.batch_size, "accumulate": s.accumulate, "seq_len": s.seq_len,
            "tokens_per_step": s.batch_size * s.accumulate * s.seq_len, "lora_rank": s.lora_rank,
            "memory": budgets[0] if budgets else None,
            "gpu_memory": budgets[1] if budgets and not is_unified(device_type) else None,
            "configs": planned, "machine": record, "notes": notes}


def nothing_fits(planned: list[dict], budgets: tuple[int, int], device_type: str) -> str:
    """One line: the budget that is short, and the minimum of the row that needs least."""
    best = min(planned, key=lambda r: r["min_memory"] + (r["min_gpu_memory"] or 0))
    short = [f"{flag}: {format_size(given)} is below {format_size(lo)} ({lo} bytes)"
             for flag, given, lo in (("--memory", budgets[0], best["min_memory"]),
                                     ("--gpu-memory", budgets[1], best["min_gpu_memory"]))
             if lo is not None and given < lo]
    return (", and ".join(short) + f", the minimum of the plan that needs least ({label(best)}, streaming "
            f"{best['unit_at_minimum']})")


# ---- printing ----------------------------------------------------------------------------------------

NAMES = {"sgd": "SGD", "adamw": "AdamW", "lion": "Lion"}


def label(row: dict) -> str:
    return "LoRA" if row["lora"] else f"full FT, {NAMES.get(row['optimizer'], row['optimizer'])}"


def format_plan(p: dict) -> list[str]:
    """The plan as a short table and a few lines."""
    m = p["model"]
    what = f"preset {m['where']}" if m["kind"] == "preset" else f"{m['where']} ({m['kind']})"
    lines = [f"{what}: {m['layers']} layers, {m['parameters'] / 1e9:.2f} B weights, {m['store_dtype']} store of "
             f"{format_size(m['store_bytes'])}",
             f"step: {p['batch_size']} x {p['accumulate']} x {p['seq_len']} tokens (B x K x T), compute "
             f"{p['compute_dtype']} on {p['device']}" + (" (unified memory: one budget)" if p["unified"] else "")
             + (f"; LoRA rank {p['lora_rank']}" if any(r["lora"] for r in p["configs"]) else "")]
    unified = p["unified"]
    if p["memory"] is not None:
        lines.append(f"budgets: --max-memory {format_size(p['memory'])}"
                     + ("" if unified else f", --max-gpu-memory {format_size(p['gpu_memory'])}"))
    header = ["", "min --max-memory"] + ([] if unified else ["min --max-gpu-memory"]) + ["streams at the minimum"]
    if p["memory"] is not None:
        header.append("at these budgets")
    header += ["disk", "read/step", "written/step", "step (estimate)"]
    table = [header]
    for r in p["configs"]:
        cells = [label(r), format_size(r["min_memory"])]
        if not unified:
            cells.append(format_size(r["min_gpu_memory"]))
        cells.append(r["unit_at_minimum"])
        if p["memory"] is not None:
            cells.append(("fits: " + r["unit"] + (", resident" if r["resident"] else "")) if r["fits"]
                         else "does not fit")
        d = r["disk"]
        cells.append(format_size(d["total"]))
        cells.append(format_size(r["bytes_read"]))
        cells.append(format_size(r["bytes_written"]) + (" (at commits)" if r["resident"] else ""))
        cells.append(f"{r['estimate_seconds']:.3g} s ({r['bound_tier']})" if r["estimate_seconds"] is not None
                     else "-")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    at = "these budgets" if p["memory"] is not None else "the minimum budgets"
    lines.append(f"disk: the store, the optimizer state and master weights beside it, and the free space a step "
                 f"needs for their new copies; read and written: one step at {at} (a row that does not fit: at "
                 "its minimum), from the SSD")
    if any(r["resident"] for r in p["configs"]):
        lines.append("resident: the model fits in memory, is read once, and written every --save-every steps")
    if p["machine"] is not None:
        lines.append("step (estimate): the least time the step can take on this machine's measured limits (the "
                     "slowest of storage, PCIe and compute, as bench's bound): a lower bound, not a measurement")
    lines += p["notes"]
    return lines
