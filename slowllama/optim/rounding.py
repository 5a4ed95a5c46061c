"""fp32 -> the store's dtype, to nearest or stochastically (unbiased) for bf16."""

from __future__ import annotations

from typing import Optional

import torch


def round_to(w32: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 -> dtype; with a generator, stochastic rounding (unbiased: E[result] = w32) for bf16."""
    bits = rounding_bits(w32, generator) if generator is not None and dtype == torch.bfloat16 else None
    return round_with_bits(w32, dtype, bits)


def rounding_bits(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The random low halves that stochastic rounding of w adds, drawn from generator (int32, w's shape)."""
    return torch.randint(0, 1 << 16, w.shape, dtype=torch.int32, device=w.device, generator=generator)


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
