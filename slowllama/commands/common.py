"""What the commands that run the model share: the engine of a command's settings (device, dtype,
budgets), the adapters of --adapter-path, and checks of --seq-len and of the disk a step needs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.engine.fleet import Fleet
from slowllama.engine.residency import split_budgets, staging_bytes, working_bytes
from slowllama.errors import SlowllamaError
from slowllama.model.args import dtype_from_name
from slowllama.model.lora import LoRAState
from slowllama.optim.base import Optimizer
from slowllama.sizes import parse_size, physical_memory
from slowllama.store.adapters import AdapterFolder
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
                activations: int = 0, fleet: Optional[Fleet] = None, **config) -> OffloadedModel:
    """The offloaded model with the device, dtype and memory budgets of a command's settings
    (--max-memory; --max-gpu-memory on a GPU), split as engine/residency.py says.

    `activations`: bytes of activations the pass would like to keep (default: a training step's).
    """
    device, dtype = resolve_device(settings)
    master = config.get("master_weights", False)
    # (with LoRA the optimizer's state is resident, yet counted here as if the store held it: stricter
    # than the engine's own staging, and what every LoRA budget so far was checked against)
    work = working_bytes(store.args, store.dtype, dtype, train=train, optimizer=optimizer, master=master,
                         lora=lora is not None, batch_size=batch_size, seq_len=seq_len, microbatches=microbatches,
                         part_elements=store.state_part_elements)
    acts = activations or (store.args.n_layers * microbatches * batch_size * seq_len * store.args.dim * dtype.itemsize
                           if train else 0)
    host = budget_setting(settings.max_memory, "--max-memory", physical_memory() // 2)
    gpu = staging = 0
    if device.type != "cpu":
        gpu = budget_setting(getattr(settings, "max_gpu_memory", "auto"), "--max-gpu-memory", device_memory(device))
        staging = staging_bytes(store.args, store.dtype, optimizer, master, config.get("lookahead", 2),
                                config.get("write_queue", 2), store.state_part_elements)
    budgets = split_budgets(device.type, host, gpu, work, acts, staging)
    cfg = EngineConfig(device=device, compute_dtype=dtype, device_budget=budgets.device,
                       activation_budget=budgets.activations, host_budget=budgets.host,
                       host_activation_budget=budgets.host_activations, **config)
    return OffloadedModel(store, cfg, optimizer=optimizer, lora=lora, fleet=fleet)


def budget_setting(value, flag: str, auto: int) -> int:
    size = auto if value in (None, "auto") else parse_size(value, flag)
    if size <= 0:
        raise SlowllamaError(f"{flag}: must be positive, got {value!r}")
    return size


def device_memory(device: torch.device) -> int:
    """Default GPU budget: 90% of the device's memory (unified memory on mps: half of the host's)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    return physical_memory() // 2


def adapter_state(store: Store, settings, device) -> "LoRAState | None":
    """The LoRA adapters of --adapter-path, for eval and generate (None without one)."""
    if not getattr(settings, "adapter_path", None):
        return None
    folder = AdapterFolder(Path(settings.adapter_path))
    if not folder.exists():
        raise SlowllamaError(f"{folder.path}: no adapter_config.json (not a slowllama adapter folder)")
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
    acts = store.args.n_layers * windows * seq_len * store.args.dim * engine.cfg.compute_dtype.itemsize
    room = engine.activation_budget.limit + engine.host_activation_budget.limit
    optimizer = engine.optimizer
    store.check_step_space(optimizer.state_bytes_per_weight if optimizer.stateful else 0,
                           4 if engine.updater.master else 0, max(0, acts - room))
