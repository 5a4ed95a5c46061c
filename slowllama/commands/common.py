"""What the commands that run the model share: the engine of a command's settings (device, dtype,
budgets), the adapters of --adapter-path, and checks of --seq-len and of the disk a step needs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from slowllama.engine.offloaded import EngineConfig, LoRAState, OffloadedModel, staging_bytes, working_bytes
from slowllama.engine.fleet import Fleet
from slowllama.errors import SlowllamaError
from slowllama.sizes import format_size, parse_size, physical_memory
from slowllama.settings import FinetuneSettings, resolve_device
from slowllama.store.store import Store


def make_engine(store: Store, settings, optimizer=None, lora=None, *, train: bool = False, batch_size: int = 1,
                seq_len: int = 1, microbatches: int = 1, activations: int = 0, fleet: Optional[Fleet] = None,
                **config) -> OffloadedModel:
    """The offloaded model with the device, dtype and memory budgets of a command's settings.

    Each budget (--max-memory; --max-gpu-memory on a GPU) is split into the working set of the module
    in flight (an estimate from the shapes), the step's cached activations (up to half of the rest)
    and resident modules. A budget below the working set is refused, naming the minimum.
    `activations`: bytes of activations the pass would like to keep (default: a training step's).
    """
    device, dtype = resolve_device(settings)
    master = config.get("master_weights", False)
    stateful = bool(optimizer is not None and optimizer.stateful)
    work = working_bytes(store.args, store.dtype, dtype, train=train, stateful=stateful, master=master,
                         lora=lora is not None, batch_size=batch_size, seq_len=seq_len, microbatches=microbatches,
                         part_elements=store.state_part_elements)
    acts = activations or (store.args.n_layers * microbatches * batch_size * seq_len * store.args.dim * dtype.itemsize
                           if train else 0)
    host = budget_setting(settings.max_memory, "--max-memory", physical_memory() // 2)
    if device.type == "cpu":
        free = host - work
        if free < 0:
            raise SlowllamaError(f"--max-memory: {format_size(host)} is below the {format_size(work)} this model "
                                 f"and step need in flight")
        act = min(acts, free // 2)
        limits = dict(device_budget=free - act, activation_budget=act)
    else:
        gpu = budget_setting(getattr(settings, "max_gpu_memory", "auto"), "--max-gpu-memory", device_memory(device))
        free = gpu - work
        if free < 0:
            raise SlowllamaError(f"--max-gpu-memory: {format_size(gpu)} is below the {format_size(work)} this model "
                                 f"and step need in flight")
        act = min(acts, free // 2)
        staging = staging_bytes(store.args, store.dtype, stateful, master, config.get("lookahead", 2),
                                config.get("write_queue", 2), store.state_part_elements)
        if host <= staging:
            raise SlowllamaError(f"--max-memory: {format_size(host)} is below the {format_size(staging)} of host "
                                 "buffers that reads and writes in flight need")
        host_act = min(acts - act, (host - staging) // 2)
        limits = dict(device_budget=free - act, activation_budget=act, host_budget=host - staging - host_act,
                      host_activation_budget=host_act)
    cfg = EngineConfig(device=device, compute_dtype=dtype, **limits, **config)
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
    from slowllama.store.adapters import AdapterFolder

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


def check_disk_for_steps(store: Store, s: FinetuneSettings, engine: OffloadedModel, optimizer, master: bool) -> None:
    """Refuse to start when the disk cannot hold one step's new files and spilled activations."""
    elsize = torch.empty((), dtype=engine.cfg.compute_dtype).element_size()
    acts = store.args.n_layers * s.batch_size * s.accumulate * s.seq_len * store.args.dim * elsize
    room = engine.activation_budget.limit + engine.host_activation_budget.limit
    spill = max(0, acts - room)
    state = getattr(optimizer, "state_dtype", torch.float32)
    store.check_step_space(2 * state.itemsize if optimizer.stateful else 0,
                           4 if master and store.dtype != torch.float32 else 0, spill)
