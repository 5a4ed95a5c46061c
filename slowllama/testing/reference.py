"""Plain in-memory training: the reference the offloaded engine is checked against (test_backprop.py, tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from slowllama.data.windows import TokenData, microbatches, step_windows
from slowllama.engine.step import module_seed
from slowllama.model.layers import IGNORE_INDEX, Transformer, cross_entropy_sum
from slowllama.model.shapes import join_key, module_names
from slowllama.store.store import Store


def store_state_dict(store_path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a store under its Meta key, in fp32 (a quantized store's dequantized)."""
    store = Store.open(store_path)
    return {join_key(name, key): t.float().clone()
            for name in module_names(store.args) for key, t in store.weights(name).items()}


def load_transformer(store_path: Path, dropout: float = 0.0) -> Transformer:
    """The whole model of a store, in memory (fp32)."""
    model = Transformer(Store.open(store_path).args, dropout)
    model.load_state_dict(store_state_dict(store_path))
    return model


def train_in_memory(model: Transformer, data: TokenData, steps: int, batch_size: int, accumulate: int,
                    seq_len: int, lr: float, seed: int = 0, order: str = "random", dropout: bool = False,
                    optimizer=None) -> Transformer:
    """The steps of `slowllama finetune`, with autograd over the whole model and torch.optim (SGD by default).

    Same windows (step_windows) and, with dropout, the same per-module seeds as the offloaded run.
    """
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for index in range(steps):
        x, y = step_windows(data, index, batch_size * accumulate, seq_len, order, seed)
        n = int((y != IGNORE_INDEX).sum())
        opt.zero_grad()
        for k, (xb, yb) in enumerate(microbatches(x, y, batch_size)):
            hook = (lambda m, k=k, s=index + 1: torch.manual_seed(module_seed(seed, s, k, m))) if dropout else None
            loss = cross_entropy_sum(model(xb, hook), yb) / n
            loss.backward()
        opt.step()
    return model


def max_relative_difference(actual: dict, expected: dict) -> dict[str, float]:
    """Per tensor: max |a - e| / max |e|."""
    return {k: float((actual[k] - expected[k]).abs().max() / expected[k].abs().max().clamp_min(1e-30))
            for k in expected}
