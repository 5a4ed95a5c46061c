"""What stays where: the memory a module in flight needs, the budgets split from plain byte counts, whether the
model fits and stays resident, and the plans of use the pipeline reads ahead by.

Each budget (host memory; a GPU's memory) is split into the working set of the module in flight
(an estimate from the shapes), the step's cached activations (up to half of the rest) and resident
modules; on a GPU, the pinned staging buffers of reads and writes in flight come off the host
budget first. A budget below the working set is refused, naming the minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from slowllama.engine.pipeline import Key
from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.shapes import model_param_count, module_shapes
from slowllama.optim.base import Optimizer
from slowllama.sizes import format_size
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS, StatePart, state_parts


def largest_part_elements(args: ModelArgs, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Elements of the largest part of any module's state."""
    return max(math.prod(p.shape) for name in ("tok_embeddings", "layers.0", "head")
               for p in state_parts(name, module_shapes(args, name), part_elements))


def _state_bytes(optimizer: Optional[Optimizer]) -> int:
    return optimizer.state_bytes_per_weight if optimizer is not None and optimizer.stateful else 0


def largest_file_bytes(args: ModelArgs, store_dtype: torch.dtype, optimizer: Optional[Optimizer] = None,
                       master: bool = False, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Bytes of the largest file a step reads or writes: a module's weights, or one part (state_parts.py) of
    its optimizer state or of its fp32 master weights. optimizer: the one whose state the store keeps (None: none)."""
    counts = model_param_count(args)
    biggest = max(counts["embeddings"], counts["block"], counts["head"]) * store_dtype.itemsize
    per_weight = max(_state_bytes(optimizer), 4 if master else 0)
    return max(biggest, largest_part_elements(args, part_elements) * per_weight)


def staging_bytes(args: ModelArgs, store_dtype: torch.dtype, optimizer: Optional[Optimizer], master: bool,
                  lookahead: int, write_queue: int, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Host memory for the pinned buffers of reads and writes in flight on cuda, and two spares kept for reuse
    (pinning is slow)."""
    return (lookahead + write_queue + 2) * largest_file_bytes(args, store_dtype, optimizer, master, part_elements)


def working_bytes(args: ModelArgs, store_dtype: torch.dtype, compute_dtype: torch.dtype, *, train: bool,
                  optimizer: Optional[Optimizer] = None, master: bool = False, lora: bool = False,
                  batch_size: int = 1, seq_len: int = 1, microbatches: int = 1, lookahead: int = 2,
                  write_queue: int = 2, head_chunk: int = 256 << 20,
                  part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """An upper estimate of the memory one module in flight needs, beyond what stays resident.
    optimizer: the one whose state the store keeps (None: none, as with SGD or LoRA's resident adapters)."""
    es, ec = store_dtype.itemsize, compute_dtype.itemsize
    counts = model_param_count(args)
    p = max(counts["embeddings"], counts["block"], counts["head"])
    per_file = largest_file_bytes(args, store_dtype, optimizer, master, part_elements)
    total = p * es + (p * ec if ec != es else 0) + lookahead * per_file
    if train and not lora:
        total += p * ec + p * es  # gradients, the new weights
        # one part's update: fp32 weights and gradient, its state in fp32 and the state's new copy, master weights
        q = largest_part_elements(args, part_elements)
        tensors = len(optimizer.state_names) if optimizer is not None else 0
        total += q * (8 + 2 * 4 * tensors + (4 if master else 0))
        total += write_queue * per_file
    tokens = batch_size * seq_len
    total += microbatches * tokens * args.dim * ec  # gradients w.r.t. the module's inputs
    # one block run (and backward) on one microbatch: projections, FFN, attention probabilities
    total += (tokens * (12 * args.dim + 4 * args.hidden_dim) * max(ec, 4)
              + 2 * batch_size * args.n_heads * seq_len ** 2 * 4)
    total += min(head_chunk, tokens * microbatches * args.vocab_size * 12)
    return int(total * 1.2)


@dataclass(frozen=True)
class Budgets:
    """Bytes for each use of each memory tier (on the CPU, device means the process's memory)."""

    device: int = 1 << 62  # resident modules on the device
    activations: int = 1 << 62  # the step's cached activations on the device
    host: int = 1 << 62  # resident modules in the host memory of a GPU
    host_activations: int = 0  # ... and activations there, before the scratch folder


def split_budgets(device_type: str, host: int, gpu: int, work: int, activations: int, staging: int) -> Budgets:
    """The budgets of a run: host (--max-memory) and gpu (--max-gpu-memory, unused on the CPU) bytes, less the
    working set `work` of the module in flight and, on a GPU, the pinned `staging` buffers; the step's
    `activations` take up to half of each remainder, resident modules the rest."""
    if device_type == "cpu":
        free = host - work
        if free < 0:
            raise SlowllamaError(f"--max-memory: {format_size(host)} is below the {format_size(work)} this model "
                                 f"and step need in flight")
        act = min(activations, free // 2)
        return Budgets(device=free - act, activations=act)
    free = gpu - work
    if free < 0:
        raise SlowllamaError(f"--max-gpu-memory: {format_size(gpu)} is below the {format_size(work)} this model "
                             f"and step need in flight")
    act = min(activations, free // 2)
    if host <= staging:
        raise SlowllamaError(f"--max-memory: {format_size(host)} is below the {format_size(staging)} of host "
                             "buffers that reads and writes in flight need")
    host_act = min(activations - act, (host - staging) // 2)
    return Budgets(device=free - act, activations=act, host=host - staging - host_act, host_activations=host_act)


def fits_in_memory(module_bytes: int, params: int, optimizer: Optional[Optimizer], master: bool,
                   room: int) -> bool:
    """Whether every module (module_bytes in all), with its optimizer state and master weights, fits `room`
    bytes of resident budgets with 10% to spare: then the model stays resident between commits."""
    total = module_bytes + params * _state_bytes(optimizer) + (4 * params if master else 0)
    return total * 1.1 <= room


def eval_plan(args: ModelArgs) -> list[Key]:
    """The order of use of a forward pass: embeddings, blocks, head (and the tied output projection)."""
    blocks = [f"layers.{i}" for i in range(args.n_layers)]
    tied = [("modules", "tok_embeddings")] if args.tie_word_embeddings else []
    return [("modules", n) for n in ["tok_embeddings"] + blocks + ["head"]] + tied


def train_plan(args: ModelArgs, parts: Callable[[str], list[StatePart]], state_kinds: list[str],
               embeddings_backward: bool) -> list[Key]:
    """The order of use of a training step: the forward pass, then the backward from the head down, each module
    followed by the parts of its state of each kind in `state_kinds` (the order its update reads them);
    embeddings_backward: the embeddings are updated last (not with LoRA: the frozen base ends at the blocks)."""
    blocks = [f"layers.{i}" for i in range(args.n_layers)]

    def with_state(name: str) -> list[Key]:
        return [("modules", name)] + [(kind, part.name) for part in parts(name) for kind in state_kinds]

    backward = with_state("head")
    if args.tie_word_embeddings:
        backward.append(("modules", "tok_embeddings"))
    for name in reversed(blocks):
        backward += with_state(name)
    if embeddings_backward:
        backward += with_state("tok_embeddings")
    return [("modules", n) for n in ["tok_embeddings"] + blocks] + backward
