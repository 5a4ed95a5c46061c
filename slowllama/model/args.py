"""Model arguments (Meta's params.json fields) and the dtype names used on the command line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.errors import SlowllamaError

# names on the command line and in manifests <-> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def finite_number(value) -> bool:
    """An int or float (not a bool) that is finite: what every number of a model's config must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise SlowllamaError(f"{what}: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class ModelArgs:
    """Everything that fixes the shapes and the math of a Llama-family model.

    The first block of fields are Meta's params.json names; the rest come from other formats
    (Hugging Face's config.json) or from the checkpoint itself. The weights' shapes: model/shapes.py.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention: fewer key/value heads than query heads
    vocab_size: int = -1  # -1: taken from the tokenizer / the embedding
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    use_scaled_rope: bool = False  # Llama 3.1's "llama3" rope scaling (Meta's name)
    # not in Meta's params.json
    hidden_dim_override: Optional[int] = None  # HF's intermediate_size, when given explicitly
    rope_scaling: Optional[dict] = None  # HF's rope_scaling dict
    tie_word_embeddings: bool = False

    # params.json fields we understand; anything else is refused rather than silently ignored
    META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                   "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "use_scaled_rope")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The feed-forward width, by Meta's formula (or HF's explicit intermediate_size)."""
        if self.hidden_dim_override:
            return self.hidden_dim_override
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self, where: str) -> "ModelArgs":
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SlowllamaError(f"{where}: field {name!r} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1):
            raise SlowllamaError(f"{where}: field 'n_kv_heads' must be a positive integer, got {self.n_kv_heads!r}")
        if not isinstance(self.vocab_size, int) or (self.vocab_size < 1 and self.vocab_size != -1):
            raise SlowllamaError(f"{where}: field 'vocab_size' must be a positive integer or -1, got {self.vocab_size!r}")
        if self.dim % self.n_heads:
            raise SlowllamaError(f"{where}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise SlowllamaError(f"{where}: head dimension {self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise SlowllamaError(f"{where}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not finite_number(value) or value <= 0:
                raise SlowllamaError(f"{where}: field {name!r} must be a positive finite number, got {value!r}")
        if self.norm_eps >= 1:
            raise SlowllamaError(f"{where}: field 'norm_eps' must be below 1, got {self.norm_eps!r}")
        if self.ffn_dim_multiplier is not None and (
                not finite_number(self.ffn_dim_multiplier) or not 0 < self.ffn_dim_multiplier <= 64):
            raise SlowllamaError(f"{where}: field 'ffn_dim_multiplier' must be a positive finite number (at most "
                                 f"64), got {self.ffn_dim_multiplier!r}")
        # sizes beyond any real model: refused before they turn into allocations
        for name, cap in (("dim", 1 << 20), ("n_layers", 1 << 12), ("n_heads", 1 << 12), ("multiple_of", 1 << 20),
                          ("max_seq_len", 1 << 24), ("vocab_size", 1 << 24), ("n_kv_heads", 1 << 12),
                          ("hidden_dim_override", 1 << 22)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value > cap):
                raise SlowllamaError(f"{where}: field {name!r} must be an integer of at most {cap}, got {value!r}")
        if self.hidden_dim_override is not None and self.hidden_dim_override < 1:
            raise SlowllamaError(f"{where}: field 'hidden_dim_override' must be positive, got "
                                 f"{self.hidden_dim_override!r}")
        for name in ("use_scaled_rope", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise SlowllamaError(f"{where}: field {name!r} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise SlowllamaError(f"{where}: field 'rope_scaling' must be an object, got {self.rope_scaling!r}")
            for key, value in self.rope_scaling.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise SlowllamaError(f"{where}: field 'rope_scaling.{key}' must be finite, got {value!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**d)
