"""Synthetic benchmark inputs: a random-weight store of a preset's shape, and random token batches.

The store is written module by module (peak memory: about one module in the store's dtype plus
one tensor in fp32), straight from the shape: no checkpoint, no tokenizer, no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from slowllama.bench.roofline import matmul_params
from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs, dtype_name
from slowllama.model.families import preset_args
from slowllama.model.shapes import module_names, module_shapes
from slowllama.store.builder import StoreBuilder
from slowllama.store.guards import check_free_space
from slowllama.store.manifest import Manifest
from slowllama.store.quantized import Quantization
from slowllama.store.safetensors_io import element_size
from slowllama.store.store import Store

SOURCE_FORMAT = "synthetic"


def bench_args(preset: str, layers: Optional[int] = None) -> ModelArgs:
    """The shape of a preset, cut (or grown) to `layers` blocks."""
    if layers is not None and layers < 1:
        raise SlowllamaError(f"--layers: must be at least 1, got {layers}")
    return preset_args(preset, **({"n_layers": layers} if layers else {}))


def store_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of the weights of a store of this shape (headers excluded)."""
    return element_size(dtype) * sum(_numel(s) for name in module_names(args)
                                     for s in module_shapes(args, name).values())


def random_module(args: ModelArgs, name: str, dtype: torch.dtype, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One module's weights: N(0, 0.02) matrices and unit norms, Meta's initialization scale, in `dtype`."""
    out = {}
    for key, shape in module_shapes(args, name).items():
        if key.endswith("norm.weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        else:
            out[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    return out


def write_random_store(path: Path, args: ModelArgs, dtype: torch.dtype, seed: int = 0, preset: str = "",
                       log: Callable[[str], None] = print, quantization: Optional[Quantization] = None,
                       device: str = "cpu") -> Path:
    """A new store of random weights at `path` (built aside and renamed into place when complete); with
    `quantization`, the blocks' linear weights quantized (on `device`: a GPU quantizes a 7B in seconds)."""
    check_free_space(Path(path).parent, store_bytes(args, dtype) + (64 << 20), str(path))
    builder = StoreBuilder(Path(path), quantization=quantization, packed=True)
    try:
        g = torch.Generator().manual_seed(seed)
        for name in tqdm(module_names(args), desc="random store", unit="module", disable=None, leave=False):
            tensors = random_module(args, name, dtype, g)
            if quantization is not None:
                tensors = {k: quantization.quantize(t.to(device)).cpu() if quantization.covers(name, k) else t
                           for k, t in sorted(tensors.items(), key=lambda kv: quantization.covers(name, kv[0]))}
            builder.write_module(name, tensors)
        return builder.finish(Manifest.new(args, dtype, {"format": SOURCE_FORMAT, "preset": preset, "seed": seed}))
    except BaseException:
        builder.abort()
        raise


def open_or_build(path: Path, args: ModelArgs, dtype: torch.dtype, seed: int = 0, preset: str = "",
                  log: Callable[[str], None] = print, quantization: Optional[Quantization] = None,
                  device: str = "cpu") -> tuple[Path, bool]:
    """A random store of this shape and dtype at `path`: reused if one is there, else written.

    Returns (path, built). A folder that holds anything else is refused rather than replaced.
    """
    path = Path(path)
    if path.exists():
        if not (path / "manifest.json").is_file():
            raise SlowllamaError(f"{path}: exists and is not a store; remove it or choose another --store-dir")
        store = Store.open(path)
        if store.args != args or store.dtype != dtype or store.quantization != quantization:
            raise SlowllamaError(f"{path}: holds a store of another shape or dtype "
                                 f"({store.args.n_layers} layers, dim {store.args.dim}, {store.manifest.dtype}, "
                                 f"{'quantized' if store.quantization else 'not quantized'}); "
                                 "remove it or choose another --store-dir")
        log(f"reusing the store {path} (at step {store.step})")
        return path, False
    n = matmul_params(args)["total"]
    count = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
    log(f"writing a random {dtype_name(dtype)} store of {count} matmul weights to {path}")
    return write_random_store(path, args, dtype, seed, preset, log, quantization, device), True


def random_batches(args: ModelArgs, step: int, batch_size: int, accumulate: int, seq_len: int,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K microbatches (inputs, targets) of one step, each (batch_size, seq_len): a random token
    stream per window, targets the next token, every target counted. Seeded by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    stream = torch.randint(args.vocab_size, (batch_size * accumulate, seq_len + 1), generator=g)
    inputs, targets = stream[:, :-1], stream[:, 1:]
    return [(inputs[i:i + batch_size], targets[i:i + batch_size])
            for i in range(0, batch_size * accumulate, batch_size)]


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
