"""Model arguments (Meta's params.json fields) and the dtype names used on the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.errors import SlowllamaError


# names on the command line and in manifests <-> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
    (Hugging Face's config.json) or from the checkpoint itself.
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
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise SlowllamaError(f"{where}: field {name!r} must be a positive number, got {value!r}")
        if self.ffn_dim_multiplier is not None and (
                not isinstance(self.ffn_dim_multiplier, (int, float)) or self.ffn_dim_multiplier <= 0):
            raise SlowllamaError(f"{where}: field 'ffn_dim_multiplier' must be a positive number, got {self.ffn_dim_multiplier!r}")
        return self

    @classmethod
    def from_params(cls, params: dict, where: str = "params.json") -> "ModelArgs":
        """Build from Meta's params.json dict; unknown fields are an error naming them."""
        if not isinstance(params, dict):
            raise SlowllamaError(f"{where}: expected a JSON object")
        unknown = sorted(set(params) - set(cls.META_FIELDS))
        if unknown:
            raise SlowllamaError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(cls.META_FIELDS)})")
        args = cls(**params)
        if "max_seq_len" not in params and args.rope_theta >= 1e6:
            args.max_seq_len = 16384  # Code Llama's context; Llama 2's is the default 4096
        return args.validate(where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**d)


def model_param_count(args: ModelArgs) -> dict:
    """Parameter counts of the offloaded modules (embeddings, one block, head)."""
    d, v, h = args.dim, args.vocab_size, args.hidden_dim
    kv = args.kv_heads * args.head_dim
    block = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d  # wq, wo, wk, wv, w1..w3, two norms
    head = d + (0 if args.tie_word_embeddings else v * d)
    return {"embeddings": v * d, "block": block, "head": head,
            "total": v * d + args.n_layers * block + head}


# Shapes of the public Llama 2 / Code Llama releases, for size tables and benchmark presets.
PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                 ffn_dim_multiplier=1.3, max_seq_len=512),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                ffn_dim_multiplier=1.3),
}


def preset_args(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise SlowllamaError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return ModelArgs(**{**PRESETS[name], **overrides}).validate(f"preset {name}")


def size_table() -> str:
    """README's table of disk and memory per model size, computed from the shapes."""
    gib = 1 << 30
    rows = ["| model | parameters | store (bf16) | largest module (bf16) | disk, full FT with SGD | "
            "disk, full FT with AdamW | disk, LoRA |",
            "|---|---|---|---|---|---|---|"]
    for name in ("7b", "13b", "70b"):
        args = preset_args(name)
        counts = model_param_count(args)
        n = counts["total"]
        largest = max(counts["embeddings"], counts["block"], counts["head"])
        store = 2 * n
        # a step writes new files beside the old ones until its commit: up to twice the weights on disk;
        # AdamW adds two fp32 moments per weight (and their new copies during a step)
        rows.append(f"| Llama 2 {name.upper()} | {n / 1e9:.2f} B | {store / gib:.1f} GiB | "
                    f"{2 * largest / gib:.2f} GiB | {2 * store / gib:.0f} GiB | "
                    f"{2 * (store + 8 * n) / gib:.0f} GiB | {store / gib:.1f} GiB |")
    return "\n".join(rows)
