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

from typing import Callable, Optional

from slowllama.config import ModelArgs
from slowllama.errors import SlowllamaError
from slowllama.model import build_module


class CompiledBlocks:
    """block(x, cos, sin) for any TransformerBlock of one model shape, through one compiled graph."""

    def __init__(self, args: ModelArgs, on_failure: Optional[Callable[[str], None]] = None):
        """on_failure: where a failed compile is reported before the blocks fall back to eager (None: an error)."""
        self.on_failure, self.failed = on_failure, False
        self.template = build_module(args, "layers.0")  # meta tensors: only its code and structure are used

        def run(params: dict[str, torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
            return functional_call(self.template, params, (x, cos, sin))

        self.run = torch.compile(run)

    def __call__(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return block(x, cos, sin)
        try:
            return self.run(dict(block.named_parameters()), x, cos, sin)
        except torch._dynamo.exc.TorchDynamoException as e:  # long; the first line says what went wrong
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.on_failure is None:
                raise SlowllamaError(f"--compile on: torch.compile failed on this machine ({first}); use "
                                     "--compile off") from e
            self.on_failure(f"--compile auto: torch.compile failed on this machine ({first}); blocks run eager")
            self.failed = True
            return block(x, cos, sin)


def wants_compile(mode: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on cuda (where triton is), not on cpu or mps."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_reason(wanted: bool, dropout: float, lora: bool) -> str:
    """Why blocks run eager although compiling was wanted ('' when they are compiled or it was not wanted)."""
    if not wanted:
        return ""
    if dropout > 0:
        return "--compile: blocks run eager with --dropout > 0 (compiled dropout masks differ from eager ones)"
    if lora:
        return "--compile: LoRA blocks run eager"
    return ""
