"""The Llama model as plain trainable nn.Modules with Meta's names; no I/O here.

The shapes of their weights come from the table in model/shapes.py. The offloaded engine runs these
modules one at a time (embeddings, each block, head); `Transformer` composes them into an ordinary
in-memory model, used for references and tests.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.families import LLAMA3_SCALED_ROPE
from slowllama.model.shapes import linear_shape, module_shapes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32 like Meta's reference, then scale in the input's dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rescaling of the rotary frequencies ("llama3" rope type)."""
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_scaling_of(args: ModelArgs) -> Optional[dict]:
    """The "llama3" scaling dict of a model, or None for plain RoPE."""
    if args.rope_scaling:
        rope_type = args.rope_scaling.get("rope_type", args.rope_scaling.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type != "llama3":
            raise SlowllamaError(f"rope scaling type {rope_type!r} is not supported (supported: llama3)")
        return args.rope_scaling
    if args.use_scaled_rope:  # Meta's params.json flag: the "llama3" scaling with its default numbers
        return {"rope_type": "llama3", **LLAMA3_SCALED_ROPE}
    return None


def rope_tables(args: ModelArgs, start: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions start..start+length-1: (length, head_dim // 2), fp32."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    scaling = rope_scaling_of(args)
    if scaling is not None:
        inv_freq = _llama3_scaled_inv_freq(inv_freq, scaling)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3)... of the head dim, as Meta's complex multiply does.

    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim // 2). Real arithmetic, so it runs on mps.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of one block for incremental decoding: (bsz, max_len, n_kv_heads, head_dim)."""

    def __init__(self, bsz: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(bsz, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class Linear(nn.Linear):
    """nn.Linear that skips its random init on the meta device, where there are no values to set: the engine
    builds every module it runs there and then assigns it its weights (a 7B block's init cost about a millisecond
    of host time, at every use of every block)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def _linear(args: ModelArgs, name: str) -> nn.Linear:
    """A linear layer of the shape table (model/shapes.py) by short name; Llama's have no bias."""
    out_features, in_features = linear_shape(args, name)
    return Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = _linear(args, "wq")
        self.wk = _linear(args, "wk")
        self.wv = _linear(args, "wv")
        self.wo = _linear(args, "wo")
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        # (bsz, n_heads, seqlen, head_dim); each key/value head serves n_heads / n_kv_heads query heads
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        kv_len = k.shape[2]
        mask, causal = None, seqlen > 1
        if causal and kv_len != seqlen:  # a chunk after cached positions: causal within, full to the past
            mask = torch.ones(seqlen, kv_len, dtype=torch.bool, device=x.device).tril(kv_len - seqlen)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.w1 = _linear(args, "w1")
        self.w2 = _linear(args, "w2")
        self.w3 = _linear(args, "w3")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.attention = Attention(args, dropout)
        self.feed_forward = FeedForward(args, dropout)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Embeddings(nn.Module):
    """Token embeddings (Meta's tok_embeddings) followed by dropout."""

    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(module_shapes(args, "tok_embeddings")["weight"]))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.embedding(tokens, self.weight))


class OutputHead(nn.Module):
    """Final norm + output projection. With tied embeddings the projection is the embedding matrix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else _linear(args, "output")

    def forward(self, h: torch.Tensor, output_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.output.weight if self.output is not None else output_weight
        return F.linear(self.norm(h), weight)


def build_module(args: ModelArgs, name: str, dropout: float = 0.0, device="meta") -> nn.Module:
    """One offloaded module by its store name: 'tok_embeddings', 'layers.N' or 'head'."""
    with torch.device(device):
        if name == "tok_embeddings":
            return Embeddings(args, dropout)
        if name == "head":
            return OutputHead(args)
        return TransformerBlock(args, dropout)


def assign_weights(module: nn.Module, tensors: dict[str, torch.Tensor], requires_grad: bool) -> nn.Module:
    """The module's parameters become `tensors` (by state dict key), as load_state_dict(assign=True) does, at a
    third of its host time: the engine does this at every use of every module it streams."""
    names = {name for name, _ in module.named_parameters()}
    if names != set(tensors):
        raise ValueError(f"weights for {sorted(names)} expected, got {sorted(tensors)}")
    for key, t in tensors.items():
        path, _, leaf = key.rpartition(".")
        owner = module.get_submodule(path)
        if getattr(owner, leaf).shape != t.shape:
            raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {tuple(getattr(owner, leaf).shape)}")
        setattr(owner, leaf, nn.Parameter(t, requires_grad=requires_grad))
    return module


SeedHook = Callable[[int], None]
IGNORE_INDEX = -100  # target id of tokens that carry no loss (masked prompts, padding)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; targets equal to IGNORE_INDEX carry no loss."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum", ignore_index=IGNORE_INDEX)


class Transformer(nn.Module):
    """The whole model in memory, with Meta's state dict keys. The reference the offloaded engine must match."""

    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.args = args
        self.tok_embeddings = Embeddings(args, dropout)
        self.layers = nn.ModuleList(TransformerBlock(args, dropout) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else _linear(args, "output")

    def forward(self, tokens: torch.Tensor, seed_hook: Optional[SeedHook] = None) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab). seed_hook(i) runs before module i (0 = embeddings), for dropout replay."""
        if seed_hook:
            seed_hook(0)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_tables(self.args, 0, tokens.shape[1], device=tokens.device)
        for i, layer in enumerate(self.layers):
            if seed_hook:
                seed_hook(i + 1)
            h = layer(h, cos, sin)
        weight = self.output.weight if self.output is not None else self.tok_embeddings.weight
        return F.linear(self.norm(h), weight)
