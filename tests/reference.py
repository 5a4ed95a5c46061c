"""Plain in-memory PyTorch: the reference every offloaded result is checked against."""

from __future__ import annotations

from pathlib import Path

import torch

from slowllama.formats.meta import META_SPLIT_DIM, read_meta_params, shard_files
from slowllama.model.layers import Transformer
from slowllama.model.shapes import split_key
from slowllama.testing.reference import store_state_dict, train_in_memory  # noqa: F401  (re-exported for tests)


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


def assert_state_close(actual: dict, expected: dict, rtol=1e-5, atol=1e-7):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key].float(), rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def train_adapters_clipped(model, params: dict, data, steps: int, batch_size: int, accumulate: int, seq_len: int,
                           lr: float, max_norm: float) -> None:
    """In-memory AdamW on LoRA adapters (no weight decay), clipped as slowllama clips them: to the exact global norm
    of the adapters' gradient, after the whole backward."""
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)

    class Clipped:
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            torch.nn.utils.clip_grad_norm_(params.values(), max_norm)
            opt.step()
    train_in_memory(model, data, steps, batch_size, accumulate, seq_len, lr, optimizer=Clipped())
