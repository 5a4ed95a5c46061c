"""fp32 -> the store's dtype, to nearest or stochastically (unbiased) for bf16.

Stochastic rounding adds 16 random bits below a bf16's last bit, then truncates. The bits come from
one of two sources, fixed for a run by whether its updates are compiled (engine/updates.py), each
reproducible from (seed, step, module, weight), so a resumed run rounds as the first did:
- eager updates draw them from a torch.Generator (`rounding_bits`), one fast kernel, an int32 tensor;
- compiled updates compute them inside the fused update from the element's index (`hashed_bits`), so
  that no tensor of bits is written and read back: on a GPU those were 8 of the 14 bytes per weight
  that a resident SGD step moves in its update. An eager fallback computes the same hash.
"""

from __future__ import annotations

from typing import Optional

import torch

_LOW32 = 0xFFFFFFFF


def round_to(w32: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 -> dtype; with a generator, stochastic rounding (unbiased: E[result] = w32) for bf16."""
    bits = rounding_bits(w32, generator) if generator is not None and dtype == torch.bfloat16 else None
    return round_with_bits(w32, dtype, bits)


def rounding_bits(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The random low halves that stochastic rounding of w adds, drawn from generator (int32, w's shape)."""
    return torch.randint(0, 1 << 16, w.shape, dtype=torch.int32, device=w.device, generator=generator)


def _times(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x and c below 2**32, with no intermediate past 2**49 (no int64 overflow, which
    eager and compiled code need not treat alike)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _LOW32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit values (int64 tensors) whose output bits each depend on every input bit
    (Wellons' lowbias32 constants)."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_bits(noise: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Stochastic rounding's bits for a part of a weight (int32 in [0, 2**16), `shape`), a hash of each element's
    index in the weight and a key. noise: int64 (key, index of the part's first element), key below 2**32.
    Integer operations only: eager and compiled give the same bits."""
    index = torch.arange(shape.numel(), dtype=torch.int64, device=noise.device).reshape(shape) + noise[1]
    return (_mix(_mix(index & _LOW32) ^ noise[0]) >> 16).to(torch.int32)


def round_with_key(w32: torch.Tensor, dtype: torch.dtype, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """round_with_bits with the bits of hashed_bits(noise) (None: round to nearest): the fused updates' rounding."""
    bits = hashed_bits(noise, w32.shape) if noise is not None and dtype == torch.bfloat16 else None
    return round_with_bits(w32, dtype, bits)


def round_with_bits(w32: torch.Tensor, dtype: torch.dtype, bits: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 -> dtype, with stochastic rounding to bf16 when given its random bits (else round to nearest).

    bf16 is the top half of an fp32: adding uniform random bits to the 16 bits that are dropped,
    then truncating, rounds up with probability equal to the dropped fraction. No generator in here,
    so torch.compile can fuse it into an update (compiled.py).
    """
    if dtype == torch.float32:
        return w32
    if bits is None or dtype != torch.bfloat16:
        return w32.to(dtype)
    rounded = (w32.contiguous().view(torch.int32) + bits) & -65536  # clear the low 16 bits
    out = rounded.view(torch.float32).to(torch.bfloat16)
    # inf/nan and values that would overflow keep round-to-nearest (no .any(): that would sync a GPU)
    return torch.where(torch.isfinite(rounded.view(torch.float32)), out, w32.to(torch.bfloat16))
