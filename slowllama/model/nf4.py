"""NF4 as in QLoRA (Dettmers et al. 2023): 4-bit NormalFloat codes, one absmax scale per block of 64 values.

A weight is flattened (row-major), cut into blocks of 64 values (the last one padded with zeros), and each
value is divided by its block's absmax and replaced by the index of the nearest of the 16 NF4 values. Two
codes go in one byte, the first in the high nibble (as bitsandbytes packs them). With double quantization the
fp32 absmax scales are themselves quantized as QLoRA does: their mean subtracted, then 8-bit blockwise in blocks
of 256 with bitsandbytes' signed dynamic map (one fp32 scale per block).

One weight is one flat uint8 tensor, so that it streams, is checksummed and read on its own like any weight:
    no double quant:  codes (blocks * 32 bytes) | absmax (blocks fp32)
    double quant:     codes (blocks * 32 bytes) | scales (groups fp32) | mean (1 fp32) | absmax codes (blocks uint8)
(the fp32 sections start at multiples of 4 bytes). Plain PyTorch: quantize and dequantize are a few vectorized
ops on any device (a table lookup and a multiply), no loop over blocks.
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 64  # values per absmax scale
SCALE_BLOCK = 256  # absmax scales per fp32 scale, with double quantization

# the 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA's published constants)
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_table(device="cpu") -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(device="cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted values in [-1, 1],
    a dynamic exponent (10^-6 .. 10^0) and a fraction of the remaining bits, plus 0 and 1."""
    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(exponent_bits - 1) + i) * means).tolist()
        data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2 ** (non_sign_bits + 1)
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the values of each byte's two codes, (256, 2); the dynamic map) on a device, made once: every use of a
    weight dequantizes it."""
    table, byte = nf4_table(device), torch.arange(256, device=device)
    return torch.stack([table[byte >> 4], table[byte & 15]], dim=1), dynamic_map(device)


def packed_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one packed weight of numel values."""
    blocks = math.ceil(numel / BLOCK)
    if double_quant:
        return blocks * BLOCK // 2 + 4 * (math.ceil(blocks / SCALE_BLOCK) + 1) + blocks
    return blocks * BLOCK // 2 + 4 * blocks


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted table (ties: the lower one), as uint8."""
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x, mids).to(torch.uint8)


def _blockwise_absmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (flat fp32, a multiple of `block`) as (blocks, block) divided by each block's absmax; and the absmax."""
    blocks = x.view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    return blocks / torch.where(absmax > 0, absmax, 1.0)[:, None], absmax  # an all-zero block stays zero


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.numel() % multiple
    return torch.cat([x, x.new_zeros(pad)]) if pad else x


def quantize(weight: torch.Tensor, double_quant: bool = False) -> torch.Tensor:
    """A weight (any shape, float) as one flat uint8 tensor of NF4 codes and scales (the layout above)."""
    x = _padded(weight.detach().reshape(-1).float(), BLOCK)
    scaled, absmax = _blockwise_absmax(x, BLOCK)
    codes = _nearest(scaled.reshape(-1), nf4_table(x.device)).view(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    if not double_quant:
        return torch.cat([packed, absmax.view(torch.uint8)])
    mean = absmax.mean()
    centered = _padded(absmax - mean, SCALE_BLOCK)
    scaled2, scales = _blockwise_absmax(centered, SCALE_BLOCK)
    qabsmax = _nearest(scaled2.reshape(-1), dynamic_map(x.device))[:absmax.numel()]
    return torch.cat([packed, scales.view(torch.uint8), mean.reshape(1).view(torch.uint8), qabsmax])


def _fp32(section: torch.Tensor) -> torch.Tensor:
    """A byte section as fp32 (copied when the file's layout left it off a 4-byte boundary)."""
    if section.storage_offset() % 4:
        section = section.clone()
    return section.view(torch.float32)


def dequantize_absmax(packed: torch.Tensor, shape: tuple[int, ...], double_quant: bool = False) -> torch.Tensor:
    """The fp32 absmax of each block of a packed weight (double quant: the 8-bit codes dequantized)."""
    blocks = math.ceil(math.prod(shape) / BLOCK)
    rest = packed[blocks * BLOCK // 2:]
    if not double_quant:
        return _fp32(rest)
    groups = math.ceil(blocks / SCALE_BLOCK)
    scales, mean = _fp32(rest[:4 * groups]), _fp32(rest[4 * groups:4 * groups + 4])
    qabsmax = rest[4 * groups + 4:]
    return _tables(packed.device)[1][qabsmax.int()] * scales.repeat_interleave(SCALE_BLOCK)[:blocks] + mean


def dequantize(packed: torch.Tensor, shape: tuple[int, ...], double_quant: bool = False,
               dtype: torch.dtype = torch.float32, expand_with=None) -> torch.Tensor:
    """The weight of `shape` a packed tensor holds, in `dtype`, on the packed tensor's device: the NF4 value of
    each code times its block's absmax, computed in fp32. expand_with: `expand` or the same compiled."""
    codes, absmax = parts(packed, shape, double_quant)
    return (expand_with or expand)(codes, absmax, pair_table(packed.device), tuple(shape), dtype)


def parts(packed: torch.Tensor, shape: tuple[int, ...], double_quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the code bytes, the fp32 absmax of each block) of a packed weight, checked: what `expand` takes."""
    check_packed(packed, shape, double_quant)
    return codes_of(packed, shape), dequantize_absmax(packed, shape, double_quant)


def check_packed(packed: torch.Tensor, shape: tuple[int, ...], double_quant: bool) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_bytes(math.prod(shape),
                                                                                          double_quant):
        raise ValueError(f"not an NF4 weight of shape {list(shape)}: {packed.dtype} {list(packed.shape)}")


def codes_of(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The code bytes of a packed weight (two 4-bit codes each), before its scales."""
    return packed[:math.ceil(math.prod(shape) / BLOCK) * BLOCK // 2]


def pair_table(device) -> torch.Tensor:
    """The NF4 values of each byte's two codes: (256, 2) fp32, on a device (made once)."""
    return _tables(torch.device(device))[0]


def expand(codes: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, shape: tuple[int, ...],
           dtype: torch.dtype) -> torch.Tensor:
    """The weight from its packed codes (uint8, two a byte) and its blocks' fp32 absmax: most of dequantize's
    work, and all of it elementwise (what engine/compiled.py compiles). pairs: pair_table(device)."""
    numel = math.prod(shape)
    # a byte -> its two values: one lookup in the (256, 2) table of pairs
    values = pairs[codes.int()].view(absmax.numel(), BLOCK) * absmax[:, None]
    return values.view(-1)[:numel].view(shape).to(dtype)


def scales_problem(packed: torch.Tensor, shape: tuple[int, ...], double_quant: bool = False) -> str:
    """What is wrong with a packed weight's scales ('' if nothing): absmax values must be finite and >= 0."""
    absmax = dequantize_absmax(packed, shape, double_quant)
    if not bool(torch.isfinite(absmax).all()):
        return "absmax scales that are not finite"
    if bool((absmax < 0).any()) and not double_quant:  # (double quant: a scale may round a hair below zero)
        return "negative absmax scales"
    return ""
