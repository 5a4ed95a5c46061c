"""A store whose blocks' linear weights are NF4 (QLoRA's base): the manifest's record of the scheme, the stored
form of each weight, and the dequantization of a module's tensors where they are used (model/nf4.py: the math).

The manifest's "quantization" field: {"scheme": "nf4", "block_size": 64, "double_quant": false, "weights": [the
block's keys stored so]}. Those weights are one flat uint8 tensor each in the module files; every other weight
(embeddings, norms, the output layer) stays in the store's dtype. Such a store is a read-only base: LoRA trains on
it, eval, generate, fuse and export read it dequantized; full fine-tuning is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.model import nf4
from slowllama.model.args import ModelArgs
from slowllama.model.shapes import LINEARS, module_shapes

FIELD = "quantization"
SCHEMES = ("nf4",)
# the block's linear weights: what --quantize stores as NF4
QUANTIZED_KEYS = tuple(f"{path}.weight" for path in LINEARS.values())


@dataclass(frozen=True)
class Quantization:
    """How a store's blocks' linear weights are stored: the scheme, its block size, double quantization."""

    scheme: str = "nf4"
    double_quant: bool = False
    block_size: int = nf4.BLOCK
    weights: tuple[str, ...] = QUANTIZED_KEYS

    @classmethod
    def from_json(cls, q, where: str) -> Quantization:
        """The record of a manifest's field, checked (a store edited by hand, or of a newer slowllama)."""
        if not isinstance(q, dict):
            raise SlowllamaError(f"{where}: field {FIELD!r} must be an object")
        if q.get("scheme") not in SCHEMES:
            raise SlowllamaError(f"{where}: {FIELD}.scheme {q.get('scheme')!r} is not one this slowllama reads "
                                 f"({', '.join(SCHEMES)})")
        if q.get("block_size") != nf4.BLOCK:
            raise SlowllamaError(f"{where}: {FIELD}.block_size {q.get('block_size')!r}: this slowllama reads "
                                 f"blocks of {nf4.BLOCK}")
        if not isinstance(q.get("double_quant"), bool):
            raise SlowllamaError(f"{where}: {FIELD}.double_quant must be true or false")
        weights = q.get("weights")
        if not isinstance(weights, list) or not weights or not set(weights) <= set(QUANTIZED_KEYS) \
                or len(set(weights)) != len(weights):
            raise SlowllamaError(f"{where}: {FIELD}.weights must list some of a block's linear weights "
                                 f"({', '.join(QUANTIZED_KEYS)})")
        return cls(q["scheme"], q["double_quant"], q["block_size"], tuple(weights))

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "block_size": self.block_size, "double_quant": self.double_quant,
                "weights": list(self.weights)}

    def covers(self, module: str, key: str) -> bool:
        """Whether weight `key` of module `module` is stored quantized."""
        return module.startswith("layers.") and key in self.weights

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        return nf4.packed_bytes(math.prod(shape), self.double_quant)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return nf4.quantize(weight, self.double_quant)

    def dequantize(self, packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return nf4.dequantize(packed, shape, self.double_quant, dtype)


def parse_scheme(scheme: Optional[str], double_quant: bool) -> Optional[Quantization]:
    """The quantization of `prepare --quantize SCHEME [--double-quant]` (None: none)."""
    if scheme is None:
        if double_quant:
            raise SlowllamaError("--double-quant: quantizes the scales of --quantize nf4; give --quantize nf4 too")
        return None
    if scheme not in SCHEMES:
        raise SlowllamaError(f"--quantize: unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    return Quantization(scheme, double_quant)


def stored_specs(args: ModelArgs, name: str, dtype: torch.dtype,
                 quant: Optional[Quantization]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of each tensor of a module's file: the weights' own, or a quantized weight's packed
    bytes (uint8, flat)."""
    return {key: (torch.uint8, (quant.stored_bytes(shape),)) if quant is not None and quant.covers(name, key)
            else (dtype, shape) for key, shape in module_shapes(args, name).items()}


def weight_bytes(args: ModelArgs, name: str, key: Optional[str], dtype: torch.dtype,
                 quant: Optional[Quantization]) -> int:
    """Bytes of a module's file (key None: its tensors), or of one of its weights, as stored."""
    specs = stored_specs(args, name, dtype, quant)
    chosen = specs.values() if key is None else [specs[key]]
    return sum(math.prod(shape) * d.itemsize for d, shape in chosen)


Dequantize = Callable[[torch.Tensor, tuple, bool, torch.dtype], torch.Tensor]  # nf4.dequantize's signature


def dequantized(quant: Optional[Quantization], name: str, tensors: dict[str, torch.Tensor],
                shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                run: Optional[Dequantize] = None) -> dict[str, torch.Tensor]:
    """A module's tensors as read (some of them packed) -> its weights, the packed ones dequantized in `dtype` (the
    store's) on the device they are on; the others as they are. run: nf4.dequantize or the same compiled."""
    if quant is None:
        return tensors
    run = run or nf4.dequantize
    return {k: run(t, shapes[k], quant.double_quant, dtype) if quant.covers(name, k) else t
            for k, t in tensors.items()}


def packed_problems(quant: Optional[Quantization], name: str, tensors: dict[str, torch.Tensor],
                    shapes: dict[str, tuple[int, ...]], where: str) -> list[str]:
    """What is wrong with a module's packed weights beyond their checksums (verify): scales that no quantize
    writes (not finite, negative)."""
    if quant is None:
        return []
    problems = []
    for key, t in tensors.items():
        problem = nf4.scales_problem(t, shapes[key], quant.double_quant) if quant.covers(name, key) else ""
        if problem:
            problems.append(f"{where}: {key!r} has {problem} (altered outside slowllama)")
    return problems
