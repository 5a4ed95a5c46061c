"""Blocks streamed by weight: a block's linear layers fetch their weight from the pipeline at each use and let
it go at once, so that no more than one weight of a block (a 70B block's largest is 235 M of its 856 M) needs
to be in memory, in forward, recompute and backward alike.

The backward of a streamed linear fetches its weight again for the input's gradient and hands its own
gradient to the block's `BlockGradients`, which sums it over the step's microbatches in the compute
dtype (as autograd sums a parameter's) and, at the last microbatch, passes the final gradient on to be
applied (updates.py) while the backward goes on: its copies are freed before the next weight's arrive.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slowllama.model.shapes import LINEARS


class BlockGradients:
    """The weights' gradients of one block over a step's microbatches; `final(key, grad)` gets each once all
    `microbatches` have passed through it."""

    def __init__(self, microbatches: int, final: Callable[[str, torch.Tensor], None]):
        self.microbatches, self.final = microbatches, final
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, grad: torch.Tensor) -> None:
        count = self.counts.get(key, 0) + 1
        total = grad if key not in self.sums else self.sums.pop(key).add_(grad)
        if count < self.microbatches:
            self.sums[key], self.counts[key] = total, count
            return
        self.counts.pop(key, None)
        self.final(key, total)


class _StreamedMatmul(torch.autograd.Function):
    """y = x W^T with W fetched at use, in forward and again in backward: the graph holds x, not W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "StreamedLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return F.linear(x, layer.weight_now())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        grad_in = grad_out.matmul(layer.weight_now())
        if layer.gradients is not None:
            layer.gradients.add(layer.key, grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(
                x.reshape(-1, x.shape[-1])))
        return grad_in, None


class StreamedLinear(nn.Module):
    """A bias-free linear layer whose weight (Meta's key `key` in its block) lives in the pipeline, not here."""

    def __init__(self, key: str, fetch: Callable[[str], torch.Tensor], gradients: Optional[BlockGradients]):
        super().__init__()
        self.key, self.fetch, self.gradients = key, fetch, gradients

    def weight_now(self) -> torch.Tensor:
        return self.fetch(self.key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StreamedMatmul.apply(x, self)


def stream_linears(block: nn.Module, fetch: Callable[[str], torch.Tensor],
                   gradients: Optional[BlockGradients]) -> nn.Module:
    """Replace a transformer block's linear layers by streamed ones (before LoRA wraps them)."""
    for path in LINEARS.values():
        parent, _, leaf = path.rpartition(".")
        setattr(block.get_submodule(parent), leaf, StreamedLinear(f"{path}.weight", fetch, gradients))
    return block


# a streamed block's weights in the order a forward pass uses them, and the order its backward does
FORWARD_ORDER = [f"{LINEARS[n]}.weight" for n in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")]
BACKWARD_ORDER = FORWARD_ORDER[::-1]
NORMS = ["attention_norm.weight", "ffn_norm.weight"]
