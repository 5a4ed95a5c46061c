"""Plain in-memory PyTorch: the reference every offloaded result is checked against."""

from __future__ import annotations

from pathlib import Path

import torch

from slowllama.blackbox_model import module_seed
from slowllama.config import ModelArgs
from slowllama.data import microbatches, step_windows
from slowllama.loader import META_SPLIT_DIM, read_meta_params, shard_files
from slowllama.model import IGNORE_INDEX, Transformer, cross_entropy_sum, split_key
from slowllama.store import Store


def meta_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Concatenate Meta shards in memory (fp32), independently of slowllama's prepare."""
    shards = [torch.load(p, weights_only=True) for p in shard_files(Path(folder))]
    out = {}
    for key in shards[0]:
        module, local = split_key(key)
        dim = META_SPLIT_DIM[local if module.startswith("layers.") else key]
        parts = [s[key].float() for s in shards]
        out[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    return out


def meta_model(folder: Path, dropout: float = 0.0) -> Transformer:
    params, args = read_meta_params(Path(folder))
    sd = meta_state_dict(folder)
    args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    model = Transformer(args, dropout)
    sd.pop("rope.freqs", None)
    model.load_state_dict(sd)
    return model


def store_state_dict(store_path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a store under its Meta key, fp32."""
    store = Store.open(store_path)
    out = {}
    for name in ["tok_embeddings"] + [f"layers.{i}" for i in range(store.args.n_layers)] + ["head"]:
        for key, t in store.read(name).items():
            full = f"{name}.{key}" if name != "head" else key
            out[full] = t.float().clone()
    return out


def train_in_memory(model: Transformer, data, steps: int, batch_size: int, accumulate: int, seq_len: int,
                    lr: float, seed: int = 0, order: str = "sequential", dropout: bool = False,
                    optimizer=None) -> Transformer:
    """The same steps as `slowllama finetune`, with autograd over the whole model and torch.optim."""
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


def assert_state_close(actual: dict, expected: dict, rtol=1e-5, atol=1e-7):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key].float(), rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
