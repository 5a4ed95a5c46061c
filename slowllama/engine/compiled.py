"""Training's transformer blocks and optimizer updates through torch.compile, so that elementwise work is fused.

Profiles of resident training steps (benchmarks/RESULTS.md) show the GPU busy but spending most of
its kernel time outside the matmuls: RMSNorm and RoPE in fp32, SwiGLU, residual adds and dtype
casts, each a separate pass over memory, run twice (forward, then the backward's recompute) plus
their own backward; then the update, a dozen more passes over each weight. Compiling fuses them.

The compiled function does not take a module: it takes a block's tensors as dicts (BlockTensors, no module
is built around them) and calls one template block (on the meta device) with them through
torch.func.functional_call. Every block then shares one graph, with no recompile per block and no guard
on module identity; with LoRA the template carries the adapters too (meta tensors of their shapes), and
the adapters of each block come in with its weights; an NF4 store's weights come packed and are
dequantized inside the graph. Compiled dropout draws its masks differently from eager dropout (still
from torch's seed, so replays match), so runs with dropout (the model's or LoRA's) keep eager blocks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import functional_call

from slowllama.errors import SlowllamaError
from slowllama.model import nf4
from slowllama.model.args import ModelArgs
from slowllama.model.layers import build_module
from slowllama.model.lora import TARGETS, LoRAConfig, inject, meta_params
from slowllama.model.shapes import module_shapes
from slowllama.optim.base import Optimizer


class _Compiled:
    """What a failed compile does. on_failure: where it is reported before the work falls back to eager
    (--compile auto); None: it is an error (--compile on)."""

    what = "work"

    def __init__(self, on_failure: Optional[Callable[[str], None]] = None):
        self.on_failure, self.failed = on_failure, False

    def _failed(self, e: Exception) -> None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # inductor's reports are long
        if self.on_failure is None:
            raise SlowllamaError(f"--compile on: torch.compile failed on this machine ({first}); use "
                                 "--compile off") from e
        self.on_failure(f"--compile auto: torch.compile failed on this machine ({first}); {self.what} run eager")
        self.failed = True


class BlockTensors:
    """A block as its compiled graph takes it: tensors by the block's state dict keys, with no nn.Module built around
    them (building one, assigning its weights and injecting its adapters was most of a block's host time at every
    use, more than its GPU time in a QLoRA step). params: the weights in the compute dtype (leaves requiring grad
    when full fine-tuning trains them) and the LoRA adapters; packed: each NF4 weight as (code bytes, fp32 absmax),
    dequantized inside the graph."""

    def __init__(self, params: dict[str, torch.Tensor], packed: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.params, self.packed = params, packed

    def named_parameters(self):
        """(key, tensor) of what the block's backward gives gradients to, as a module's named_parameters does."""
        return self.params.items()


class CompiledBlocks(_Compiled):
    """block(BlockTensors, x, cos, sin) for any TransformerBlock of one model shape, through one compiled graph.

    A quantized store's NF4 weights come packed and are dequantized in the graph as the engine's modules get them
    (model/nf4.py: to the store's dtype, then to the compute dtype), so a block use is one call, not one per weight
    plus the block's."""

    what = "blocks"

    def __init__(self, args: ModelArgs, on_failure: Optional[Callable[[str], None]] = None,
                 lora: Optional[LoRAConfig] = None, store_dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(on_failure)
        self.template = build_module(args, "layers.0")  # meta tensors: only its code and structure are used
        shapes = module_shapes(args, "layers.0")
        # a state dict key -> the template's name of it (an adapted linear's weight is its LoRALinear's base's)
        self.names = {key: key for key in shapes}
        if lora is not None:
            inject(self.template, meta_params(args, lora), lora)
            self.names.update({key: key for key in meta_params(args, lora)})
            self.names.update({f"{TARGETS[t]}.weight": f"{TARGETS[t]}.base.weight" for t in lora.targets})

        def run(params: dict[str, torch.Tensor], packed: dict[str, tuple[torch.Tensor, torch.Tensor]],
                pairs: Optional[torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
            weights = {self.names[k]: t for k, t in params.items()}
            for key, (codes, absmax) in packed.items():
                weights[self.names[key]] = nf4.expand(codes, absmax, pairs, shapes[key], store_dtype).to(compute_dtype)
            return functional_call(self.template, weights, (x, cos, sin))

        self.eager, self.run = run, torch.compile(run)

    def __call__(self, block: BlockTensors, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pairs = nf4.pair_table(x.device) if block.packed else None
        if not self.failed:
            try:
                return self.run(block.params, block.packed, pairs, x, cos, sin)
            except torch._dynamo.exc.TorchDynamoException as e:
                self._failed(e)
        return self.eager(block.params, block.packed, pairs, x, cos, sin)


def wants_compile(mode: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on cuda (where triton is), not on cpu or mps."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_reason(wanted: bool, dropout: float, lora_dropout: float = 0.0, by_weight: bool = False) -> str:
    """Why blocks run eager although compiling was wanted ('' when they are compiled or it was not wanted)."""
    if not wanted:
        return ""
    if by_weight:  # their linears fetch weights from the pipeline mid-block: nothing a graph can hold
        return "--compile: blocks streamed by weight run eager (the step is bound by the disk)"
    if dropout > 0:
        return "--compile: blocks run eager with --dropout > 0 (compiled dropout masks differ from eager ones)"
    if lora_dropout > 0:
        return "--compile: LoRA blocks run eager with --lora-dropout > 0 (compiled dropout masks differ from eager ones)"
    return ""


class CompiledUpdates(_Compiled):
    """An optimizer's updates, each part of a weight in one fused pass (rounding included).

    Eager, an update is a dozen passes over each weight: upcasts, the update's ops, the stochastic
    rounding's bit operations. This compiles the optimizer's `fused` (optim/base.py), the same
    arithmetic as its eager `update` (the fused order of fp32 operations may round differently in
    the last bit). Stochastic rounding's bits are hashed inside the pass from a key and each element's
    index (optim/rounding.py), not read from a tensor of drawn bits: a resumed run rounds as the first
    one did, and a failed compile's eager fallback hashes the same bits.
    """

    what = "updates"

    def __init__(self, optimizer: Optimizer, on_failure: Optional[Callable[[str], None]] = None):
        super().__init__(on_failure)
        self.run = torch.compile(type(optimizer).fused)

    def __call__(self, w: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, scalars: torch.Tensor,
                 state: tuple[torch.Tensor, ...], noise: Optional[torch.Tensor]):
        """(new weight, new state tensors) of one part, compiled; None once compiling has failed (the caller
        runs the eager update)."""
        if self.failed:
            return None
        try:
            return self.run(w, g, coef, scalars, state, noise)
        except torch._dynamo.exc.TorchDynamoException as e:
            self._failed(e)
            return None


class CompiledDequantize(_Compiled):
    """NF4 dequantization with its elementwise part compiled (nf4.expand): eager, that part is four passes over a
    weight (the codes widened, the lookup, the multiply by the absmax, the cast), each writing fp32; compiled,
    one pass reads the packed codes and writes the weight. The same arithmetic (a lookup and one fp32 multiply):
    the same bits. The scales are decoded eagerly (a 64th of the weight; their byte sections are reinterpreted as
    fp32, which is no place for a compiler). For the modules the engine builds (eval, generation, blocks streamed
    by weight: on the CPU, 5× faster per weight); a training step's compiled blocks dequantize in their own graph."""

    what = "NF4 weights dequantized"

    def __init__(self, on_failure: Optional[Callable[[str], None]] = None):
        super().__init__(on_failure)
        self.run = torch.compile(nf4.expand, dynamic=False)  # a block has a few weight shapes, each one graph

    def __call__(self, packed: torch.Tensor, shape: tuple, double_quant: bool, dtype: torch.dtype) -> torch.Tensor:
        if not self.failed:
            try:
                return nf4.dequantize(packed, shape, double_quant, dtype, expand_with=self.run)
            except torch._dynamo.exc.TorchDynamoException as e:
                self._failed(e)
        return nf4.dequantize(packed, shape, double_quant, dtype)
