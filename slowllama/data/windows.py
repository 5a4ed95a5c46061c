"""Training and evaluation data: tokens, labels, windows and the batches of each step.

A .txt file is one sequence, encoded as the tokenizer's config says (BOS / EOS where add_bos_token /
add_eos_token say, as transformers' tokenizer(text) gives it). A .jsonl file holds records (records.py),
each tokenized as its own sequence [BOS] + tokens + [EOS] (sequences.py; BOS where the config adds it). Each position has a label
(the token itself, or IGNORE_INDEX where no loss is wanted: prompts, padding). A window of T+1
positions starting at i gives inputs tokens[i:i+T] and targets labels[i+1:i+T+1].

Layouts: packed (default), the sequences one after the other in one stream, cut into windows that
cross record boundaries; or padded, one window of T+1 positions per record (pad id, label IGNORE).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from slowllama.data.records import read_text
from slowllama.data.sequences import Example, load_examples
from slowllama.errors import SlowllamaError
from slowllama.model.layers import IGNORE_INDEX
from slowllama.model.tokenizer import Tokenizer


@dataclass
class TokenData:
    tokens: torch.Tensor  # (n,) int64
    labels: torch.Tensor  # (n,) int64, IGNORE_INDEX where a token carries no loss
    source: str
    window: Optional[int] = None  # fixed windows of this many positions (padded records); None: one stream
    starts_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.tokens.numel()


def load_text(path: Path, tokenizer: Tokenizer) -> TokenData:
    """A .txt file as one sequence, BOS / EOS as the tokenizer's config says, every token a target."""
    ids = tokenizer.encode_text(read_text(path))
    tokens = torch.tensor(ids, dtype=torch.long)
    return TokenData(tokens, tokens.clone(), str(path))


def pack(examples: list[Example], source: str) -> TokenData:
    """The sequences one after the other in one stream (windows cross record boundaries)."""
    return TokenData(torch.cat([e.tokens for e in examples]), torch.cat([e.masked_labels() for e in examples]),
                     source)


def pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id if it has one, else EOS (padding carries no loss and follows the record)."""
    pid = getattr(tokenizer, "pad_id", None)
    if pid is None and getattr(tokenizer, "sp", None) is not None:
        pid = tokenizer.sp.pad_id()
    return pid if pid is not None and pid >= 0 else tokenizer.eos_id


def pad(examples: list[Example], seq_len: int, pad_token: int, source: str,
        notes: Optional[list[str]] = None) -> TokenData:
    """One window of seq_len + 1 positions per sequence: longer ones truncated, shorter ones padded."""
    n = seq_len + 1
    tokens = torch.full((len(examples), n), pad_token, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    truncated = 0
    for row, e in enumerate(examples):
        k = min(n, len(e.tokens))
        truncated += len(e.tokens) > n
        tokens[row, :k], labels[row, :k] = e.tokens[:k], e.masked_labels()[:k]
    if truncated and notes is not None:
        notes.append(f"{source}: {truncated} of {len(examples)} records are longer than --seq-len + 1 = {n} "
                     "tokens and were truncated (--pack keeps them whole)")
    return TokenData(tokens.reshape(-1), labels.reshape(-1), source, window=n)


def layout(examples: list[Example], seq_len: int, packed: bool, tokenizer: Tokenizer, source: str,
           notes: Optional[list[str]] = None) -> TokenData:
    """Packed or padded, checked to hold at least one window with a target."""
    data = pack(examples, source) if packed else pad(examples, seq_len, pad_id(tokenizer), source, notes)
    window_starts(data, seq_len, aligned=True)  # raises if no window has a target
    return data


def load_data(path: Path, tokenizer: Tokenizer, seq_len: Optional[int] = None, packed: bool = True,
              mask_prompt: bool = True, skip_bad_lines: bool = False,
              log: Optional[Callable[[str], None]] = None) -> TokenData:
    """A .txt or .jsonl file, packed (or padded to seq_len + 1 per record), checked to hold one window."""
    notes = []
    examples = load_examples(path, tokenizer, mask_prompt, skip_bad_lines, notes)
    data = pack(examples, str(path)) if seq_len is None else layout(examples, seq_len, packed, tokenizer,
                                                                     str(path), notes)
    for line in notes if log else ():
        log(line)
    return data


def split_seed(seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"split/{seed}".encode(), digest_size=8).digest(), "little") >> 1


def split_indices(n: int, fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(train, validation) indices of n items: round(fraction * n) (at least 1) drawn by a seeded permutation."""
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise SlowllamaError(f"--val-split {fraction}: {n} {what} leave none for training")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed(seed))).tolist()
    val = sorted(perm[:n_val])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def split_windows(data: TokenData, seq_len: int, fraction: float, seed: int) -> tuple[TokenData, TokenData]:
    """One sequence split by its eval windows: each part a set of fixed windows of seq_len + 1."""
    n = count_windows(data, seq_len)
    w = seq_len + 1
    train, val = split_indices(n, fraction, seed, f"windows of --seq-len {seq_len} in {data.source}")

    def part(idx, name):
        rows = torch.tensor(idx) * w
        pick = (rows[:, None] + torch.arange(w)).reshape(-1)
        out = TokenData(data.tokens[pick], data.labels[pick], f"{data.source} ({name})", window=w)
        window_starts(out, seq_len, aligned=True)  # raises if none of its windows has a target
        return out

    return part(train, "training split"), part(val, "validation split")


def folder_file(folder: Path, name: str, why: str) -> Path:
    """NAME in a data folder (mlx-lm's layout: train.jsonl, valid.jsonl, test.jsonl), or an error naming both."""
    path = folder / name
    if not path.is_file():
        raise SlowllamaError(f"{folder}: a data folder without {name} ({why}; a data folder holds train.jsonl, "
                             "valid.jsonl and test.jsonl, as mlx-lm has them)")
    return path


def eval_file(data, log: Callable[[str], None]) -> Path:
    """eval's data: the file, or a data folder's test.jsonl."""
    if not Path(data).is_dir():
        return Path(data)
    path = folder_file(Path(data), "test.jsonl", "eval reads it")
    log(f"{data}: evaluating on test.jsonl")
    return path


def load_train_val(s, tokenizer: Tokenizer, log: Callable[[str], None]) -> tuple[TokenData, Optional[TokenData]]:
    """finetune's training and validation data from its settings (data, val_data or val_split, pack, ...).

    val_split holds out records (of a file with at least two), else windows of the one sequence.
    """
    notes = []
    data_path, val_path = s.data, s.val_data
    if Path(s.data).is_dir():  # mlx-lm's layout: train.jsonl, and valid.jsonl for validation
        folder = Path(s.data)
        data_path = folder_file(folder, "train.jsonl", "finetune trains on it")
        valid = folder / "valid.jsonl"
        if valid.is_file() and not s.val_data and not s.val_split:
            val_path = valid
        notes.append(f"{folder}: training on train.jsonl" + (", validating on valid.jsonl" if val_path == valid
                                                              else ", no validation from the folder"))
    examples = load_examples(data_path, tokenizer, s.mask_prompt, s.skip_bad_lines, notes)
    val = None
    if val_path:
        val = load_data(val_path, tokenizer, s.seq_len, s.pack, s.mask_prompt, s.skip_bad_lines, notes.append)
    if s.val_split and len(examples) >= 2:
        train_idx, val_idx = split_indices(len(examples), s.val_split, s.seed, f"records in {data_path}")
        notes.append(f"{data_path}: {len(val_idx)} of {len(examples)} records held out for validation "
                     f"(--val-split {s.val_split}, seed {s.seed})")
        val = layout([examples[i] for i in val_idx], s.seq_len, s.pack, tokenizer,
                     f"{data_path} (validation split)", notes)
        examples = [examples[i] for i in train_idx]
    data = layout(examples, s.seq_len, s.pack, tokenizer, str(data_path), notes)
    if s.val_split and val is None:  # one sequence (a .txt file): split its windows
        data, val = split_windows(data, s.seq_len, s.val_split, s.seed)
        n_val = count_windows(val, s.seq_len)
        notes.append(f"{data_path}: {n_val} of {n_val + count_windows(data, s.seq_len)} windows held out for "
                     f"validation (--val-split {s.val_split}, seed {s.seed})")
    for line in notes:
        log(line)
    return data, val


def count_windows(data: TokenData, seq_len: int) -> int:
    """Number of consecutive non-overlapping windows of seq_len + 1 tokens (eval's windows)."""
    if data.window is not None and data.window != seq_len + 1:
        raise ValueError(f"{data.source}: laid out in windows of {data.window}, not {seq_len + 1}")
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


def window_starts(data: TokenData, seq_len: int, aligned: bool) -> Optional[torch.Tensor]:
    """Starts of the windows that hold at least one target (aligned: eval's windows, else any start).

    None when every window does (every position after the first is a target, as in a .txt file).
    Masked prompts and padding can leave windows without targets: steps never draw those.
    """
    key = (seq_len, aligned)
    if key not in data.starts_cache:
        n = count_windows(data, seq_len)
        has = data.labels != IGNORE_INDEX
        starts = None
        if not bool(has[1:].all()):
            w = seq_len + 1
            starts = torch.arange(n) * w if aligned or data.window else torch.arange(len(data) - seq_len)
            cum = torch.cat([torch.zeros(1, dtype=torch.long), has.long().cumsum(0)])  # targets in labels[:i]
            starts = starts[cum[starts + w] - cum[starts + 1] > 0]
            if starts.numel() == 0:
                why = (f"records cut to --seq-len + 1 = {w} tokens before their completions? use a larger "
                       "--seq-len or --pack" if data.window else "prompts longer than a window? use a larger "
                       "--seq-len or --no-mask-prompt")
                raise SlowllamaError(f"{data.source}: no window of --seq-len {seq_len} has a token with loss ({why})")
        data.starts_cache[key] = starts
    return data.starts_cache[key]


def step_windows(data: TokenData, step: int, count: int, seq_len: int, order: str, seed: int):
    """The `count` windows of step `step` (0-based), as (inputs, targets) of shape (count, seq_len).

    Only windows with at least one target take part (window_starts); with every position a target:
    sequential: eval's windows step*count .. (step+1)*count - 1, wrapping around at the end.
    random: from a generator seeded with (seed, step), so any step's batch is known without
    replaying the ones before it (exact resume): in a stream, starts drawn uniformly from
    [0, len - seq_len - 1]; in fixed windows (padded records), windows drawn uniformly.
    """
    n = count_windows(data, seq_len)
    w = seq_len + 1
    aligned = order == "sequential" or data.window is not None
    valid = window_starts(data, seq_len, aligned)
    if order == "sequential":
        picks = [(step * count + j) % (n if valid is None else len(valid)) for j in range(count)]
    else:
        g = torch.Generator().manual_seed(step_seed(seed, step))
        choices = n if aligned else len(data) - seq_len
        picks = torch.randint(choices if valid is None else len(valid), (count,), generator=g).tolist()
    if valid is not None:
        starts = [int(valid[i]) for i in picks]
    else:
        starts = [i * w for i in picks] if aligned else picks
    return stack([window(data, s, seq_len) for s in starts])


def microbatches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    """Split a step's windows into consecutive microbatches of batch_size."""
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]
