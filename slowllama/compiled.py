"""Transformer blocks run through torch.compile, so that their elementwise work is fused.

Profiles of resident training steps (benchmarks/RESULTS.md) show the GPU busy but spending most of
its kernel time outside the matmuls: RMSNorm and RoPE in fp32, SwiGLU, residual adds and dtype
casts, each a separate pass over memory, run twice (forward, then the backward's recompute) plus
their own backward. Compiling the block fuses them.

The engine builds a fresh module around every loaded block, so the compiled function does not take
the module: it takes its parameters as a dict and calls one template block (on the meta device)
with them through torch.func.functional_call. Every block then shares one graph, with no recompile
per block and no guard on module identity. Compiled dropout draws its masks differently from eager
dropout (still from torch's seed, so replays match), so runs with dropout stay eager, as do LoRA
blocks (their modules change shape).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from slowllama.config import ModelArgs
from slowllama.errors import SlowllamaError
from slowllama.model import build_module


class CompiledBlocks:
    """block(x, cos, sin) for any TransformerBlock of one model shape, through one compiled graph."""

    def __init__(self, args: ModelArgs):
        self.template = build_module(args, "layers.0")  # meta tensors: only its code and structure are used

        def run(params: dict[str, torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
            return functional_call(self.template, params, (x, cos, sin))

        self.run = torch.compile(run)

    def __call__(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        try:
            return self.run(dict(block.named_parameters()), x, cos, sin)
        except torch._dynamo.exc.TorchDynamoException as e:  # long; the first line says what went wrong
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SlowllamaError(f"--compile: torch.compile failed on this machine ({first}); run without "
                                 "--compile") from e


def compile_reason(requested: bool, dropout: float, lora: bool) -> str:
    """Why blocks run eager although --compile was asked for ('' when they are compiled or it was not asked)."""
    if not requested:
        return ""
    if dropout > 0:
        return "--compile: blocks run eager with --dropout > 0 (compiled dropout masks differ from eager ones)"
    if lora:
        return "--compile: LoRA blocks run eager"
    return ""
