"""What stays where: the memory a module in flight needs, the budgets split from plain byte counts, whether the
model fits and stays resident, and the plans of use the pipeline reads ahead by.

Each budget (host memory; a GPU's memory) is split into the working set of the module in flight
(an estimate from the shapes), the step's cached activations (up to half of the rest) and resident
modules; on a GPU, the pinned staging buffers of reads and writes in flight come off the host
budget first. A budget below the working set is refused, naming the minimum. Where the whole model
stays resident on the device with room to spare, that room goes to the activations too: blocks keep
their forward pass's autograd graph and skip the recompute (chain.py), as many of the last blocks
as it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from slowllama.engine.pipeline import Key
from slowllama.engine.streamed import BACKWARD_ORDER, FORWARD_ORDER, NORMS
from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.shapes import model_param_count, module_shapes
from slowllama.optim.base import Optimizer
from slowllama.sizes import format_size
from slowllama.store.quantized import Quantization, weight_bytes
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS, StatePart, piece_name, state_parts

# what the process uses beyond the budgets, the runtime itself: the interpreter, torch and its kernels, the
# tokenizer, the data. Measured: 0.45 GiB RSS before the first step on the CPU box; with CUDA (its context,
# cuBLAS and the other kernels' libraries) 1.7 GiB beyond a fully used --max-memory on the H200 machine
HOST_ALLOWANCE = 1 << 30
CUDA_HOST_ALLOWANCE = 2 << 30
DEVICE_ALLOWANCE = 512 << 20  # cuBLAS/attention workspaces and the caching allocator's rounding


def host_allowance(device_type: str) -> int:
    return CUDA_HOST_ALLOWANCE if device_type == "cuda" else HOST_ALLOWANCE


def largest_part_elements(args: ModelArgs, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Elements of the largest part of any module's state."""
    return max(math.prod(p.shape) for name in ("tok_embeddings", "layers.0", "head")
               for p in state_parts(name, module_shapes(args, name), part_elements))


def largest_unit_elements(args: ModelArgs, unit: str = "block") -> int:
    """Weights of the largest thing that streams: a module, or with unit "weight" one weight of a block
    (the embeddings and the head stream whole either way)."""
    counts = model_param_count(args)
    block = counts["block"] if unit != "weight" else max(math.prod(s) for s in module_shapes(args, "layers.0").values())
    return max(counts["embeddings"], block, counts["head"])


def largest_unit_bytes(args: ModelArgs, store_dtype: torch.dtype, unit: str = "block",
                       quant: Optional[Quantization] = None) -> int:
    """Bytes (as stored: a quantized store's packed) of the largest thing that streams (largest_unit_elements)."""
    if unit != "weight":
        block = weight_bytes(args, "layers.0", None, store_dtype, quant)
    else:
        block = max(weight_bytes(args, "layers.0", k, store_dtype, quant) for k in module_shapes(args, "layers.0"))
    return max(block, *(weight_bytes(args, name, None, store_dtype, quant) for name in ("tok_embeddings", "head")))


def _state_bytes(optimizer: Optional[Optimizer]) -> int:
    return optimizer.state_bytes_per_weight if optimizer is not None and optimizer.stateful else 0


def largest_file_bytes(args: ModelArgs, store_dtype: torch.dtype, optimizer: Optional[Optimizer] = None,
                       master: bool = False, part_elements: int = DEFAULT_PART_ELEMENTS, unit: str = "block",
                       quant: Optional[Quantization] = None) -> int:
    """Bytes of the largest read or write of a step: a module's weights (a weight's, by unit "weight"), or one part
    (state_parts.py) of its optimizer state or of its fp32 master weights. optimizer: the one whose state the store
    keeps (None: none). quant: the store's quantization (its blocks' files are smaller)."""
    biggest = largest_unit_bytes(args, store_dtype, unit, quant)
    per_weight = max(_state_bytes(optimizer), 4 if master else 0)
    return max(biggest, largest_part_elements(args, part_elements) * per_weight)


def staging_bytes(args: ModelArgs, store_dtype: torch.dtype, optimizer: Optional[Optimizer], master: bool,
                  lookahead: int, write_queue: int, part_elements: int = DEFAULT_PART_ELEMENTS,
                  unit: str = "block", quant: Optional[Quantization] = None) -> int:
    """Host memory for the pinned buffers of reads and writes in flight on cuda, and two spares kept for reuse
    (pinning is slow): in bytes, since the pipeline's read-ahead and write queue are capped in bytes too."""
    per_file = largest_file_bytes(args, store_dtype, optimizer, master, part_elements, unit, quant)
    return (lookahead + write_queue + 2) * per_file


def working_bytes(args: ModelArgs, store_dtype: torch.dtype, compute_dtype: torch.dtype, *, train: bool,
                  optimizer: Optional[Optimizer] = None, master: bool = False, lora: bool = False,
                  batch_size: int = 1, seq_len: int = 1, microbatches: int = 1, lookahead: int = 2,
                  write_queue: int = 2, head_chunk: int = 256 << 20,
                  part_elements: int = DEFAULT_PART_ELEMENTS, unit: str = "block",
                  quant: Optional[Quantization] = None, ranks: int = 1) -> int:
    """An upper estimate of the memory what is in flight needs, beyond what stays resident: the unit in use (a
    module, or one weight of a block), its gradient and new version, the reads ahead, the update of one part.
    optimizer: the one whose state the store keeps (None: none, as with SGD or LoRA's resident adapters).
    ranks > 1 (replicas.py): the module broadcast ahead of its use, and a gradient waiting for its reduce."""
    es, ec = store_dtype.itemsize, compute_dtype.itemsize
    p = largest_unit_elements(args, unit)
    per_file = largest_file_bytes(args, store_dtype, optimizer, master, part_elements, unit, quant)
    total = largest_unit_bytes(args, store_dtype, unit, quant) + (p * ec if ec != es else 0) + lookahead * per_file
    if quant is not None:  # the unit's weights dequantized (the store's dtype, then the compute dtype), one weight's
        # fp32 values on the way
        packed = [math.prod(s) for k, s in module_shapes(args, "layers.0").items() if quant.covers("layers.0", k)]
        total += (sum(packed) if unit != "weight" else max(packed)) * (es + (ec if ec != es else 0)) + max(packed) * 4
    if train and not lora:
        total += p * ec + p * es  # gradients, the new weights
        if unit == "weight" and microbatches > 1:  # a block's weights' gradients wait for its last microbatch
            total += model_param_count(args)["block"] * ec
        # one part's update: fp32 weights and gradient, its state in fp32 and the state's new copy, master weights
        q = largest_part_elements(args, part_elements)
        tensors = len(optimizer.state_names) if optimizer is not None else 0
        total += q * (8 + 2 * 4 * tensors + (4 if master else 0))
        total += write_queue * per_file
    if unit == "weight":  # the norms of the block in use stay with it
        total += 2 * args.dim * (es + ec)
    if ranks > 1:
        total += p * es + (p * max(ec, 4) if train and not lora else 0)  # (gradients reduce in fp32 or ec)
    tokens = batch_size * seq_len
    total += microbatches * tokens * args.dim * ec  # gradients w.r.t. the module's inputs
    # one block run (and backward) on one microbatch: projections, FFN, attention probabilities
    total += (tokens * (12 * args.dim + 4 * args.hidden_dim) * max(ec, 4)
              + 2 * batch_size * args.n_heads * seq_len ** 2 * 4)
    total += min(head_chunk, tokens * microbatches * args.vocab_size * 12)
    return int(total * 1.2)


def block_input_bytes(args: ModelArgs, compute_dtype: torch.dtype, tokens: int) -> int:
    """Bytes of one block's input over `tokens` tokens: what the activation cache keeps per block."""
    return tokens * args.dim * compute_dtype.itemsize


def graph_bytes(args: ModelArgs, compute_dtype: torch.dtype, batch_size: int, seq_len: int, dropout: float = 0.0) -> int:
    """An upper estimate of what one block's autograd graph holds for one microbatch (beyond its input, which it
    replaces in the cache): the tensors eager autograd saves, with a fifth to spare (compiled blocks save fewer)."""
    ec, d, h = compute_dtype.itemsize, args.dim, args.hidden_dim
    kv = args.kv_heads * args.head_dim
    per_token = 4 * (4 * d + d + kv)  # both norms' fp32 input and normalized values, RoPE's fp32 q and k
    per_token += ec * (2 * d + 3 * d + 2 * d + 4 * h)  # norms' outputs; q, k, v (repeated); attention out, reshaped;
    #                                                     the FFN's w1 and w3 outputs, silu, their product
    if dropout > 0:
        per_token += 3 * d + h  # bool masks: residuals, FFN, (attention's probabilities below)
    tokens = batch_size * seq_len
    attention = batch_size * args.n_heads * seq_len ** 2 * (4 + (1 if dropout > 0 else 0))  # a math-path fallback
    return int((tokens * per_token + attention) * 1.2)


def kept_block_bytes(args: ModelArgs, store_dtype: torch.dtype, compute_dtype: torch.dtype, batch_size: int,
                     seq_len: int, microbatches: int, dropout: float = 0.0,
                     quant: Optional[Quantization] = None) -> int:
    """What a block that keeps its forward graph holds until its backward: the graphs of its microbatches and,
    where the block computes with copies of its weights (dequantized, or cast to the compute dtype), those
    copies, which the graph keeps alive."""
    graphs = microbatches * graph_bytes(args, compute_dtype, batch_size, seq_len, dropout)
    copies = quant is not None or store_dtype != compute_dtype
    return graphs + (model_param_count(args)["block"] * compute_dtype.itemsize if copies else 0)


@dataclass(frozen=True)
class Need:
    """What a pass needs of memory whatever the budgets: the working set of what is in flight, the pinned staging
    of reads and writes (cuda), and the activations it would like to keep; and how it streams: the unit, and the
    bytes read ahead and written behind that the working set counts."""

    work: int
    staging: int
    activations: int
    unit: str = "block"
    lookahead: int = 2
    write_queue: int = 2
    read_bytes: int = 1 << 62
    write_bytes: int = 1 << 62
    graphs: int = 0  # beyond `activations`: every block's graph kept from the forward pass (no recompute)


def memory_need(args: ModelArgs, store_dtype: torch.dtype, compute_dtype: torch.dtype, device_type: str, *,
                train: bool, optimizer: Optional[Optimizer] = None, master: bool = False, lora: bool = False,
                batch_size: int = 1, seq_len: int = 1, microbatches: int = 1, lookahead: int = 2,
                write_queue: int = 2, part_elements: int = DEFAULT_PART_ELEMENTS, unit: str = "block",
                activations: int = 0, dropout: float = 0.0, quant: Optional[Quantization] = None,
                ranks: int = 1) -> Need:
    """The need of a pass at one streaming unit ("block" or "weight") with `lookahead` reads ahead and
    `write_queue` writes in flight, each of at most the largest file. activations: bytes the pass would keep
    (default: a training step's block inputs). optimizer: the one whose state the store keeps (LoRA's adapters
    keep theirs resident, counted here as if streamed: a margin)."""
    work = working_bytes(args, store_dtype, compute_dtype, train=train, optimizer=optimizer, master=master, lora=lora,
                         batch_size=batch_size, seq_len=seq_len, microbatches=microbatches, lookahead=lookahead,
                         write_queue=write_queue, part_elements=part_elements, unit=unit, quant=quant, ranks=ranks)
    staging = staging_bytes(args, store_dtype, optimizer, master, lookahead, write_queue, part_elements, unit, quant) \
        if device_type == "cuda" else 0  # pinned buffers buy nothing on cpu and mps: reads land in plain memory
    inputs = block_input_bytes(args, compute_dtype, microbatches * batch_size * seq_len)  # one block's, cached
    if not activations and train:
        activations = args.n_layers * inputs
    graphs = 0
    if train and unit == "block":  # a kept block holds its graph instead of its cached input
        kept = kept_block_bytes(args, store_dtype, compute_dtype, batch_size, seq_len, microbatches, dropout, quant)
        graphs = args.n_layers * max(0, kept - inputs)
    per_file = largest_file_bytes(args, store_dtype, optimizer, master, part_elements, unit, quant)
    return Need(work, staging, activations, unit, lookahead, write_queue, max(1, lookahead) * per_file,
                max(1, write_queue) * per_file, graphs)


@dataclass(frozen=True)
class Budgets:
    """Bytes for each use of each memory tier (on the CPU and in unified memory, device means the process's
    memory)."""

    device: int = 1 << 62  # resident modules on the device
    activations: int = 1 << 62  # the step's cached activations on the device
    host: int = 1 << 62  # resident modules in the host memory of a GPU
    host_activations: int = 0  # ... and activations there, before the scratch folder


def is_unified(device_type: str) -> bool:
    """Whether the device computes in the host's own memory (Apple silicon): one budget covers both."""
    return device_type in ("cpu", "mps")


def split_budgets(device_type: str, host: int, gpu: int, need: Need, resident: Optional[int] = None) -> Budgets:
    """The budgets of a run: host (--max-memory) and gpu (--max-gpu-memory: a GPU of its own only) bytes, less the
    working set of what is in flight and, on cuda, the pinned staging buffers; the step's activations take up to
    half of each remainder, resident modules the rest. A budget below the need is refused, naming the minimum.
    resident: bytes of the whole model with its optimizer state; where they fit the device's share with 10% to
    spare, what is left over goes to the activations too, up to the need's kept graphs."""
    def with_graphs(device: int, act: int) -> tuple[int, int]:
        room = device - int(resident * 1.1) if resident is not None else 0
        graphs = max(0, min(need.graphs, room))
        return device - graphs, act + graphs

    if is_unified(device_type):
        free = host - need.work
        if free < 0:
            raise SlowllamaError(f"--max-memory: {format_size(host)} is below the {format_size(need.work)} this "
                                 f"model and step need in flight (the minimum: {need.work} bytes)")
        act = min(need.activations, free // 2)
        device, act = with_graphs(free - act, act)
        return Budgets(device=device, activations=act, host=0 if device_type == "mps" else 1 << 62)
    free = gpu - need.work
    if free < 0:
        raise SlowllamaError(f"--max-gpu-memory: {format_size(gpu)} is below the {format_size(need.work)} this model "
                             f"and step need in flight (the minimum: {need.work} bytes)")
    act = min(need.activations, free // 2)
    if host <= need.staging:
        raise SlowllamaError(f"--max-memory: {format_size(host)} is below the {format_size(need.staging + 1)} of "
                             f"host buffers that reads and writes in flight need (the minimum: {need.staging + 1} bytes)")
    host_act = min(need.activations - act, (host - need.staging) // 2)
    device, act = with_graphs(free - act, act)
    return Budgets(device=device, activations=act, host=host - need.staging - host_act, host_activations=host_act)


def minimum_budgets(device_type: str, need: Need) -> tuple[int, int]:
    """The smallest (--max-memory, --max-gpu-memory) that split_budgets accepts for `need` (gpu 0: none apart)."""
    if is_unified(device_type):
        return need.work, 0
    return need.staging + 1, need.work


def choose_need(unit: str, device_type: str, host: int, gpu: int, lookahead: int, write_queue: int,
                needs: Callable[[str, int, int], Need]) -> Need:
    """How a run streams: the first of these whose need fits the budgets (the last if none does, to be refused
    naming its minimum): whole blocks (fewer, larger reads; compiled blocks), each weight of a block, each weight
    with one read ahead and one write in flight. `unit` "block" or "weight" keeps to that unit.
    needs(unit, lookahead, write_queue) -> Need."""
    rungs = [("block", lookahead, write_queue), ("weight", lookahead, write_queue),
             ("weight", min(lookahead, 1), min(write_queue, 1))]
    rungs = [r for r in rungs if unit in ("auto", r[0])]
    for rung in rungs:
        need = needs(*rung)
        lo_host, lo_gpu = minimum_budgets(device_type, need)
        if host >= lo_host and gpu >= lo_gpu:
            return need
    return need


def resident_bytes(module_bytes: int, params: int, optimizer: Optional[Optimizer], master: bool) -> int:
    """Bytes of every module (module_bytes in all) with its optimizer state and master weights."""
    return module_bytes + params * _state_bytes(optimizer) + (4 * params if master else 0)


def fits_in_memory(module_bytes: int, params: int, optimizer: Optional[Optimizer], master: bool,
                   room: int) -> bool:
    """Whether every module (module_bytes in all), with its optimizer state and master weights, fits `room`
    bytes of resident budgets with 10% to spare: then the model stays resident between commits."""
    return resident_bytes(module_bytes, params, optimizer, master) * 1.1 <= room


def _block_forward(name: str, unit: str, microbatches: int) -> list[Key]:
    """A block's keys in a forward pass (or its recompute) over the microbatches."""
    if unit != "weight":
        return [("modules", name)]
    norms = [("modules", piece_name(name, k)) for k in NORMS]
    return norms + [("modules", piece_name(name, k)) for _ in range(microbatches) for k in FORWARD_ORDER]


def eval_plan(args: ModelArgs, unit: str = "block", microbatches: int = 1) -> list[Key]:
    """The order of use of a forward pass: embeddings, blocks, head (and the tied output projection)."""
    blocks = [key for i in range(args.n_layers) for key in _block_forward(f"layers.{i}", unit, microbatches)]
    tied = [("modules", "tok_embeddings")] if args.tie_word_embeddings else []
    return [("modules", "tok_embeddings")] + blocks + [("modules", "head")] + tied


def step_uses(args: ModelArgs, embeddings_backward: bool) -> list[str]:
    """The modules a training step of whole blocks asks for, in order: the forward pass, then the backward's (the
    head, with a tied output projection the embeddings, the blocks down, the embeddings unless LoRA)."""
    blocks = [f"layers.{i}" for i in range(args.n_layers)]
    return (["tok_embeddings"] + blocks + ["head"] + (["tok_embeddings"] if args.tie_word_embeddings else [])
            + blocks[::-1] + (["tok_embeddings"] if embeddings_backward else []))


def train_plan(args: ModelArgs, parts: Callable[[str], list[StatePart]], state_kinds: list[str],
               embeddings_backward: bool, unit: str = "block", microbatches: int = 1,
               graphs: int = 0, deferred_updates: int = 0) -> list[Key]:
    """The order of use of a training step: the forward pass, then the backward from the head down, each module
    followed by the parts of its state of each kind in `state_kinds` (the order its update reads them);
    embeddings_backward: the embeddings are updated last (not with LoRA: the frozen base ends at the blocks).
    A block streamed by weight: its recompute and backward per microbatch, each weight's state after its
    last backward, then its norms' updates. graphs: the last blocks that keep their forward graph, so
    re-read nothing for their backward (with state_kinds, their update still asks for the weights; one rank).
    deferred_updates d > 0 (several ranks, whole blocks, replicas.py): each module's update (its weights asked for
    again, then its state) comes once the next updated module has been asked for and d - 1 modules after it
    (its gradient's reduce overlaps that module's backward; each module is asked for one use ahead, d = 2)."""
    blocks = [f"layers.{i}" for i in range(args.n_layers)]

    def state(name: str, key: Optional[str] = None) -> list[Key]:
        return [(kind, part.name) for part in parts(name) if key is None or part.key == key for kind in state_kinds]

    def with_state(name: str) -> list[Key]:
        return [("modules", name)] + state(name)

    def block_backward(name: str) -> list[Key]:
        if unit != "weight":
            kept = int(name.split(".")[1]) >= args.n_layers - graphs
            frozen = not embeddings_backward  # LoRA: no update asks for a block's weights either
            return [] if kept and frozen else with_state(name)
        keys = [("modules", piece_name(name, k)) for k in NORMS]
        for k in range(microbatches):
            keys += [("modules", piece_name(name, w)) for w in FORWARD_ORDER]
            for w in BACKWARD_ORDER:
                keys += [("modules", piece_name(name, w))] + (state(name, w) if k == microbatches - 1 else [])
        for w in NORMS:
            keys += [("modules", piece_name(name, w))] + state(name, w)
        return keys

    if deferred_updates:
        uses = step_uses(args, embeddings_backward)
        updated = ["head"] + blocks[::-1] + (["tok_embeddings"] if embeddings_backward else [])
        last_use = {name: i for i, name in enumerate(uses)}  # a module's backward: its last use
        after: dict[int, list[str]] = {}  # index in uses -> the updates that come right after that use
        for name, following in zip(updated, updated[1:] + [None]):
            at = len(uses) - 1 if following is None else min(last_use[following] + deferred_updates - 1,
                                                               len(uses) - 1)
            after.setdefault(at, []).append(name)
        return [key for i, name in enumerate(uses)
                for key in [("modules", name)] + [k for done in after.get(i, []) for k in with_state(done)]]
    backward = with_state("head")
    if args.tie_word_embeddings:
        backward.append(("modules", "tok_embeddings"))
    for name in reversed(blocks):
        backward += block_backward(name)
    if embeddings_backward:
        backward += with_state("tok_embeddings")
    forward = [key for name in blocks for key in _block_forward(name, unit, microbatches)]
    return [("modules", "tok_embeddings")] + forward + backward
