"""Training and evaluation data: tokens, labels, windows and the batches of each step.

A text file becomes one sequence [BOS] + encode(text) + [EOS]. Each position has a label (the
token itself, or IGNORE_INDEX where no loss is wanted, e.g. prompts). A window of T+1 positions
starting at i gives inputs tokens[i:i+T] and targets labels[i+1:i+T+1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from slowllama.errors import SlowllamaError
from slowllama.model import IGNORE_INDEX
from slowllama.tokenizer import Tokenizer


@dataclass
class TokenData:
    tokens: torch.Tensor  # (n,) int64
    labels: torch.Tensor  # (n,) int64, IGNORE_INDEX where a token carries no loss
    source: str

    def __len__(self) -> int:
        return self.tokens.numel()


def read_text(path: Path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SlowllamaError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise SlowllamaError(f"{path}: is a folder, not a data file") from None
    except OSError as e:
        raise SlowllamaError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlowllamaError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise SlowllamaError(f"{path}: empty data file")
    return text


def load_text(path: Path, tokenizer: Tokenizer) -> TokenData:
    """A .txt file as one sequence: [BOS] + encode(text) + [EOS], every token a target."""
    ids = tokenizer.encode(read_text(path), bos=True, eos=True)
    tokens = torch.tensor(ids, dtype=torch.long)
    return TokenData(tokens, tokens.clone(), str(path))


def load_data(path: Path, tokenizer: Tokenizer) -> TokenData:
    return load_text(path, tokenizer)


def count_windows(data: TokenData, seq_len: int) -> int:
    """Number of consecutive non-overlapping windows of seq_len + 1 tokens (eval's windows)."""
    n = len(data) // (seq_len + 1)
    if n == 0:
        raise SlowllamaError(f"{data.source}: has {len(data)} tokens, one window of --seq-len {seq_len} "
                             f"needs {seq_len + 1}")
    return n


def window(data: TokenData, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return data.tokens[start:start + seq_len], data.labels[start + 1:start + seq_len + 1]


def eval_batches(data: TokenData, seq_len: int, batch_size: int):
    """Eval's windows in order, batch by batch: (inputs, targets), each (b, seq_len)."""
    n = count_windows(data, seq_len)
    for first in range(0, n, batch_size):
        idx = range(first, min(first + batch_size, n))
        yield stack([window(data, i * (seq_len + 1), seq_len) for i in idx])


def stack(pairs):
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"data/{seed}/{step}".encode(), digest_size=8).digest(), "little") >> 1


def step_windows(data: TokenData, step: int, count: int, seq_len: int, order: str, seed: int):
    """The `count` windows of step `step` (0-based), as (inputs, targets) of shape (count, seq_len).

    sequential: eval's windows step*count .. (step+1)*count - 1, wrapping around at the end.
    random: starts drawn uniformly from [0, len - seq_len - 1] by a generator seeded with (seed, step),
    so any step's batch is known without replaying the ones before it (exact resume).
    """
    if order == "sequential":
        n = count_windows(data, seq_len)
        starts = [((step * count + j) % n) * (seq_len + 1) for j in range(count)]
    else:
        if len(data) < seq_len + 1:
            count_windows(data, seq_len)  # raises the clear error
        g = torch.Generator().manual_seed(step_seed(seed, step))
        starts = torch.randint(len(data) - seq_len, (count,), generator=g).tolist()
    return stack([window(data, s, seq_len) for s in starts])


def microbatches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    """Split a step's windows into consecutive microbatches of batch_size."""
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]


def has_targets(targets: torch.Tensor) -> bool:
    return bool((targets != IGNORE_INDEX).any())
