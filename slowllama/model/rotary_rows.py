"""The two row orders of wq / wk: Meta rotates consecutive pairs (x0, x1), (x2, x3)... of each head;
Hugging Face's rotate_half pairs x_i with x_{i + head_dim/2}. Its conversion script therefore reorders
the rows within each head: the first elements of Meta's pairs first, then the second elements.
Rows of head h: Meta [a0, b0, a1, b1, ...] <-> HF [a0, a1, ..., b0, b1, ...].

A row permutation, so it applies to anything with those rows: the weight, and LoRA's B (P (B A) = (P B) A)."""

from __future__ import annotations

import torch


def rotary_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rows -> HF's halves. w: (n_heads * head_dim, in)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def rotary_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's halves -> Meta's interleaved rows. w: (n_heads * head_dim, in)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()
