"""The arithmetic of a training step's limits: its FLOPs, its time per tier, the bound and efficiency.

Pure functions of shapes, byte counts and measured bandwidths, so each can be checked by hand.

FLOPs count only matrix multiplications (2 per multiply-add). N is the number of weights that
multiply activations: the linear layers of every block and the output projection (vocab x dim,
also when it is tied to the embeddings). The embedding lookup is a gather and the norms are
elementwise, so they add no matmul FLOPs. For T tokens:
  model FLOPs    = 6 N T + 3 A   (forward 2 N T + A, backward twice the forward)
  hardware FLOPs = 8 N_blocks T + 6 N_head T + 4 A   (the engine runs every block forward twice:
                   once in the forward pass, once more to backpropagate it; the head only once)
where A is the forward FLOPs of attention's two matmuls (Q K^T and P V), with the causal mask's
skipped half not counted: query i meets i + 1 keys, so a window of S tokens costs
2 * 2 * (n_heads * head_dim) * S (S + 1) / 2 per layer.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from slowllama.model.args import ModelArgs
from slowllama.model.shapes import LINEARS, linear_shape


def matmul_params(args: ModelArgs) -> dict[str, int]:
    """Weights that take part in matmuls: all blocks' linear layers and the output projection."""
    blocks = args.n_layers * sum(math.prod(linear_shape(args, name)) for name in LINEARS)  # wq, wk, wv, wo, w1..w3
    head = math.prod(linear_shape(args, "output"))  # also when tied: the embedding matrix multiplies then
    return {"blocks": blocks, "head": head, "total": blocks + head}


def attention_flops(args: ModelArgs, windows: int, seq_len: int) -> int:
    """Forward FLOPs of Q K^T and P V over `windows` causal windows of seq_len tokens, all layers."""
    width = args.n_heads * args.head_dim
    per_window_layer = 2 * width * seq_len * (seq_len + 1)  # 2 matmuls x 2 FLOPs x width x S(S+1)/2
    return args.n_layers * windows * per_window_layer


@dataclass(frozen=True)
class StepFlops:
    model: int  # 6 N T + 3 A: what the training step needs, the numerator of model FLOPs utilization
    hardware: int  # what this engine computes, the forward recompute of every block included


def step_flops(args: ModelArgs, windows: int, seq_len: int, recomputed: Optional[int] = None) -> StepFlops:
    """FLOPs of one training step over `windows` windows of seq_len tokens (module docstring); recomputed: how many
    blocks are re-run in the backward (default all; the others kept their forward graph)."""
    n = matmul_params(args)
    tokens = windows * seq_len
    a = attention_flops(args, windows, seq_len)
    share = 1.0 if recomputed is None else recomputed / args.n_layers
    model = 6 * n["total"] * tokens + 3 * a
    hardware = int((6 + 2 * share) * n["blocks"] * tokens + 6 * n["head"] * tokens + (3 + share) * a)
    return StepFlops(model=model, hardware=hardware)


@dataclass(frozen=True)
class Machine:
    """What the machine measured (bytes/s, FLOP/s); None where it could not be measured."""

    disk_read: float  # sequential reads with the page cache dropped
    disk_write: float  # sequential writes, fsync included
    page_cache_read: float  # reads of a file that is in the page cache
    matmul: float  # FLOP/s of large matmuls in the compute dtype on the compute device
    h2d: Optional[float] = None  # pinned host -> GPU copies
    d2h: Optional[float] = None  # GPU -> pinned host copies


def tier_seconds(bytes_read: int, bytes_written: int, hardware_flops: int, machine: Machine,
                 cache_dropped: bool, h2d_bytes: Optional[int] = None,
                 d2h_bytes: Optional[int] = None) -> dict[str, float]:
    """The least time each tier needs for a step's work, alone.

    storage: reads / read bandwidth + writes / write bandwidth (one disk does both). Reads come
      from the SSD when the page cache is dropped, else they are counted at page-cache speed.
    pcie: the slower of the two copy directions, which run at the same time (full duplex);
      only when the engine counted its host <-> device bytes and the machine could measure them.
    compute: hardware FLOPs / measured matmul peak.
    """
    read_bw = machine.disk_read if cache_dropped else machine.page_cache_read
    out = {"storage": bytes_read / read_bw + bytes_written / machine.disk_write}
    if machine.h2d and machine.d2h and (h2d_bytes is not None or d2h_bytes is not None):
        out["pcie"] = max((h2d_bytes or 0) / machine.h2d, (d2h_bytes or 0) / machine.d2h)
    out["compute"] = hardware_flops / machine.matmul
    return out


def bound(tiers: dict[str, float]) -> tuple[str, float]:
    """The tier that limits the step, and its time: no step can be faster than the slowest tier."""
    name = max(tiers, key=tiers.get)
    return name, tiers[name]


def efficiency(bound_seconds: float, actual_seconds: float) -> float:
    """bound / actual: 1.0 means the step ran at the machine's limit, 0.5 twice as slow as it."""
    return bound_seconds / actual_seconds


def median_after_warmup(values: list[float]) -> Optional[float]:
    """The median of every step but the first (warm-up); the only value when there is one step."""
    kept = [v for v in (values[1:] if len(values) > 1 else values) if v is not None]
    return statistics.median(kept) if kept else None
