"""LoRA adapters on a frozen base: y = W x + (alpha / rank) · B A dropout(x).

The layers, their initialization, their shapes and merging them into the base weights. The
adapter folder's files: store/adapters.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.shapes import LINEARS, linear_shape

TARGETS = LINEARS  # any linear layer of a block: short name -> its path in the block
# Hugging Face's names of the same linears (--lora-targets takes either; PEFT's target_modules use these)
HF_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
              "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoRAConfig":
        if self.rank < 1:
            raise SlowllamaError(f"--lora-rank: must be at least 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise SlowllamaError(f"--lora-alpha: must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise SlowllamaError(f"--lora-dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise SlowllamaError(f"--lora-targets: unknown target {unknown[0] if unknown else '(none)'!r} "
                                 f"(choose from {','.join(TARGETS)} or {','.join(HF_TARGETS)})")
        return self


@dataclass
class LoRAState:
    """Resident LoRA adapters of every block (fp32 Parameters) and their optimizer state."""

    cfg: LoRAConfig
    params: dict[str, nn.Parameter]  # "layers.N.attention.wq.lora_a" -> (rank, in), "...lora_b" -> (out, rank)
    optim_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def block(self, name: str) -> dict[str, nn.Parameter]:
        """Block `name`'s adapters, keyed as in the block (block_params', looked up: a step asks at every block use)."""
        return {f"{TARGETS[t]}.{ab}": self.params[f"{name}.{TARGETS[t]}.{ab}"]
                for t in self.cfg.targets for ab in ("lora_a", "lora_b")}


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets: Meta's names, Hugging Face's (q_proj -> wq...) or both mixed; each once, in Meta's names
    (an unknown name is kept for LoRAConfig.validate to refuse)."""
    names = [HF_TARGETS.get(t.strip(), t.strip()) for t in str(text).split(",") if t.strip()]
    return tuple(dict.fromkeys(names))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b = a, b  # (rank, in), (out, rank): shared with the resident Adapters
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scale * low


def _child(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return module.get_submodule(parent), leaf


def inject(block: nn.Module, params: dict[str, torch.Tensor], cfg: LoRAConfig) -> nn.Module:
    """Replace the target linears of a transformer block with LoRALinear around the given A, B."""
    for t in cfg.targets:
        path = TARGETS[t]
        parent, leaf = _child(block, path)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), params[f"{path}.lora_a"],
                                         params[f"{path}.lora_b"], cfg.scale, cfg.dropout))
    return block


def init_params(args: ModelArgs, cfg: LoRAConfig, seed: int, device) -> dict[str, torch.Tensor]:
    """A ~ kaiming-uniform (as nn.Linear's default init), B = 0: the adapted model starts as the base."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i in range(args.n_layers):
        for t in cfg.targets:
            out_f, in_f = linear_shape(args, t)
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
            a = (torch.rand(cfg.rank, in_f, generator=g) * 2 - 1) * bound
            params[f"layers.{i}.{TARGETS[t]}.lora_a"] = a.to(device)
            params[f"layers.{i}.{TARGETS[t]}.lora_b"] = torch.zeros(out_f, cfg.rank, device=device)
    return params


def meta_params(args: ModelArgs, cfg: LoRAConfig) -> dict[str, nn.Parameter]:
    """One block's adapters as meta tensors (shapes only), keyed as block_params gives them."""
    params = {}
    for t in cfg.targets:
        out_f, in_f = linear_shape(args, t)
        params[f"{TARGETS[t]}.lora_a"] = nn.Parameter(torch.empty(cfg.rank, in_f, device="meta"))
        params[f"{TARGETS[t]}.lora_b"] = nn.Parameter(torch.empty(out_f, cfg.rank, device="meta"))
    return params


def block_params(params: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    prefix = block + "."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def merged_module(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor], cfg: LoRAConfig,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A block's weights with W + scale · B A merged in (fp32 arithmetic), in `dtype`."""
    out = dict(tensors)
    for t in cfg.targets:
        key = f"{TARGETS[t]}.weight"
        a, b = params[f"{TARGETS[t]}.lora_a"].float(), params[f"{TARGETS[t]}.lora_b"].float()
        out[key] = (tensors[key].float() + cfg.scale * (b @ a)).to(dtype)
    return out
