"""What the commands that run the model share: the engine of a command's settings (device, dtype,
budgets), the adapters of --adapter-path, and checks of --seq-len and of the disk a step needs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from slowllama.engine.chain import EngineConfig, OffloadedModel, keeps_master
from slowllama.engine.fleet import Fleet
from slowllama.engine.residency import (Need, block_input_bytes, choose_need, is_unified, memory_need, minimum_budgets,
                                        resident_bytes, split_budgets)
from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs, dtype_from_name
from slowllama.model.lora import LoRAState
from slowllama.model.shapes import model_param_count, module_names
from slowllama.optim.base import Optimizer
from slowllama.sizes import format_size, parse_size, physical_memory
from slowllama.store.adapters import AdapterFolder
from slowllama.store.quantized import Quantization
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS
from slowllama.store.store import Store


def resolve_device(settings) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype a command runs with (auto: cuda, then mps, then cpu)."""
    name = settings.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlowllamaError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SlowllamaError("--device mps: MPS is not available")
    default = {"cpu": "fp32", "cuda": "bf16", "mps": "fp16"}[name]
    dtype = dtype_from_name(settings.compute_dtype or default, "--compute-dtype")
    if name == "mps" and dtype == torch.bfloat16:
        raise SlowllamaError("--compute-dtype bf16: not supported on mps (use fp16 or fp32)")
    return torch.device(name), dtype


def make_engine(store: Store, settings, optimizer: Optional[Optimizer] = None, lora: Optional[LoRAState] = None, *,
                train: bool = False, batch_size: int = 1, seq_len: int = 1, microbatches: int = 1,
                activations: int = 0, fleet: Optional[Fleet] = None, log: Callable[[str], None] = lambda m: None,
                **config) -> OffloadedModel:
    """The offloaded model with the device, dtype, streaming unit and memory budgets of a command's settings
    (--max-memory; --max-gpu-memory on a GPU of its own), split as engine/residency.py says.

    `activations`: bytes of activations the pass would like to keep (default: a training step's).
    """
    device, dtype = resolve_device(settings)
    host, gpu = run_budgets(settings, device)

    master = config.get("master_weights", False)
    needs = step_needs(store.args, store.dtype, dtype, device.type, train=train, optimizer=optimizer,
                       master=master, lora=lora is not None, batch_size=batch_size,
                       seq_len=seq_len, microbatches=microbatches, part_elements=store.state_part_elements,
                       activations=activations, dropout=config.get("dropout", 0.0), quant=store.quantization,
                       ranks=fleet.world if fleet is not None and fleet.active else 1)
    unit = getattr(settings, "stream_unit", "auto")
    if fleet is not None and fleet.active:
        if unit == "weight":
            raise SlowllamaError("--stream-unit weight: several ranks stream whole blocks (use block or auto)")
        unit = "block"
    need = choose_need(unit, device.type, host, gpu, config.pop("lookahead", 2), config.pop("write_queue", 2), needs)
    if need.unit == "weight" and unit == "auto":
        whole = sum(minimum_budgets(device.type, needs("block", 2, 2)))
        log(f"streaming each weight of a block: whole blocks would need {format_size(whole)} of the budgets")
    resident = None  # the whole model's bytes, where room left beside it may keep blocks' graphs (no recompute)
    if train and config.get("keep_graphs", True) and not (fleet is not None and fleet.active):
        resident = resident_bytes(sum(store.module_bytes(n) for n in module_names(store.args)),
                                  model_param_count(store.args)["total"], optimizer if lora is None else None,
                                  keeps_master(store, master, lora))
    budgets = split_budgets(device.type, host, gpu, need, resident)
    cfg = EngineConfig(device=device, compute_dtype=dtype, device_budget=budgets.device,
                       activation_budget=budgets.activations, host_budget=budgets.host,
                       host_activation_budget=budgets.host_activations, unit=need.unit,
                       lookahead=need.lookahead, write_queue=need.write_queue, read_ahead_bytes=need.read_bytes,
                       write_bytes=need.write_bytes, **config)
    return OffloadedModel(store, cfg, optimizer=optimizer, lora=lora, fleet=fleet)


def log_kept_graphs(engine: OffloadedModel, batch_size: int, seq_len: int, microbatches: int,
                    log: Callable[[str], None]) -> int:
    """Say how many blocks keep their forward graph in a step of these shapes (and return it)."""
    kept = engine.kept_graph_count(batch_size, seq_len, microbatches)
    if kept:
        log(f"the last {kept} of {engine.args.n_layers} blocks keep their forward pass's graph: no recompute in "
            "their backward")
    return kept


def step_needs(args: ModelArgs, store_dtype: torch.dtype, compute_dtype: torch.dtype, device_type: str, *,
               train: bool, optimizer: Optional[Optimizer], master: bool, lora: bool, batch_size: int, seq_len: int,
               microbatches: int, part_elements: int = DEFAULT_PART_ELEMENTS,
               activations: int = 0, dropout: float = 0.0, quant: Optional[Quantization] = None,
               ranks: int = 1) -> Callable[[str, int, int], Need]:
    """needs(unit, lookahead, write_queue) -> the Need of a pass with these settings (residency.choose_need's
    argument): one function for the engine of a run and for `slowllama plan`, so that both agree. optimizer: the
    run's (with LoRA its adapters', counted as if the store kept their state); ranks: of a torchrun."""
    def needs(unit: str, lookahead: int, write_queue: int) -> Need:
        return memory_need(args, store_dtype, compute_dtype, device_type, train=train, optimizer=optimizer,
                           master=master, lora=lora, batch_size=batch_size, seq_len=seq_len,
                           microbatches=microbatches, lookahead=lookahead, write_queue=write_queue,
                           part_elements=part_elements, unit=unit, activations=activations, dropout=dropout,
                           quant=quant, ranks=ranks)
    return needs


def run_budgets(settings, device: torch.device) -> tuple[int, int]:
    """(--max-memory, --max-gpu-memory) in bytes, their defaults resolved; on a unified-memory device (mps) one
    budget covers host and GPU, and --max-gpu-memory is refused."""
    gpu_setting = getattr(settings, "max_gpu_memory", "auto")
    if is_unified(device.type):
        if device.type == "mps" and gpu_setting not in (None, "auto"):
            raise SlowllamaError("--max-gpu-memory: mps computes in the host's memory; give the whole budget as "
                                 "--max-memory")
        return budget_setting(settings.max_memory, "--max-memory", default_host_budget(device.type)), 0
    return (budget_setting(settings.max_memory, "--max-memory", default_host_budget(device.type)),
            budget_setting(gpu_setting, "--max-gpu-memory", device_memory(device)))


def default_host_budget(device_type: str, physical: Optional[int] = None) -> int:
    """--max-memory auto: half of physical memory, or on mps (where it covers the GPU too) three quarters, leaving
    the system at least 4 GiB (12 GiB of a 16 GB Mac)."""
    physical = physical_memory() if physical is None else physical
    if device_type == "mps":
        return max(physical // 4, min(physical * 3 // 4, physical - (4 << 30)))
    return physical // 2


def budget_setting(value, flag: str, auto: int) -> int:
    size = auto if value in (None, "auto") else parse_size(value, flag)
    if size <= 0:
        raise SlowllamaError(f"{flag}: must be positive, got {value!r}")
    return size


def device_memory(device: torch.device) -> int:
    """Default GPU budget: 90% of the device's memory."""
    return int(torch.cuda.get_device_properties(device).total_memory * 0.9)


def adapter_state(store: Store, settings, device) -> "LoRAState | None":
    """The LoRA adapters of --adapter-path, for eval and generate (None without one)."""
    if not getattr(settings, "adapter_path", None):
        return None
    folder = AdapterFolder(Path(settings.adapter_path))
    if not folder.exists():
        raise SlowllamaError(f"{folder.path}: no adapter_config.json (not a slowllama or PEFT adapter folder)")
    cfg = folder.load_config(store.args)
    params = folder.load_params(store.args, cfg, device)
    return LoRAState(cfg, {k: torch.nn.Parameter(v, requires_grad=False) for k, v in params.items()})


def check_seq_len(seq_len: int, engine_or_args) -> None:
    args = getattr(engine_or_args, "args", engine_or_args)
    if seq_len < 1:
        raise SlowllamaError(f"--seq-len: must be at least 1, got {seq_len}")
    if seq_len > args.max_seq_len:
        raise SlowllamaError(f"--seq-len: {seq_len} is above the model's max_seq_len {args.max_seq_len}")


def check_disk_for_steps(store: Store, engine: OffloadedModel, windows: int, seq_len: int) -> None:
    """Refuse to start when the disk cannot hold one step's new files (weights, optimizer state, master weights)
    and the activations of `windows` windows of seq_len tokens that the memory budgets leave to spill."""
    acts = store.args.n_layers * block_input_bytes(store.args, engine.cfg.compute_dtype, windows * seq_len)
    room = engine.activation_budget.limit + engine.host_activation_budget.limit
    optimizer = engine.optimizer
    store.check_step_space(optimizer.state_bytes_per_weight if optimizer.stateful else 0,
                           4 if engine.updater.master else 0, max(0, acts - room))
