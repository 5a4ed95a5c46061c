"""The embedded default: a small random-weight Llama in Meta's format, so a newcomer needs no download."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from slowllama.data.windows import read_text
from slowllama.errors import SlowllamaError
from slowllama.formats.meta import args_from_params, meta_split_dim
from slowllama.model.args import ModelArgs, dtype_from_name
from slowllama.model.families import PRESETS
from slowllama.model.shapes import expected_shapes
from slowllama.model.tokenizer import train_tokenizer
from slowllama.store.destination import check_destination

# chapter 1 of Alice's Adventures in Wonderland (public domain), shipped with the package
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "assets" / "alice.txt"


def random_state_dict(args: ModelArgs, seed: int = 0, rope_freqs: bool = True) -> dict[str, torch.Tensor]:
    """Meta-named fp32 weights: N(0, 0.02) matrices and unit norms (plus Meta's rope.freqs extra)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expected_shapes(args).items():
        sd[key] = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
    if rope_freqs:
        hd = args.head_dim
        sd["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    return sd


def save_meta_shards(sd: dict[str, torch.Tensor], args: ModelArgs, out: Path, shards: int, dtype: torch.dtype) -> None:
    """Cut a full state dict into Meta's model-parallel shards consolidated.NN.pth."""
    for i in range(shards):
        piece = {}
        for key, t in sd.items():
            dim = meta_split_dim(key, args) if shards > 1 else None
            if dim is not None:
                size = t.shape[dim] // shards
                t = t.narrow(dim, i * size, size)
            piece[key] = t.to(dtype).contiguous().clone()
        torch.save(piece, out / f"consolidated.{i:02d}.pth")


def write_tiny(out: Path, *, text: Optional[Path] = None, shards: int = 2, dtype: str = "bf16", seed: int = 0,
               force: bool = False, **overrides) -> Path:
    """Write a tiny random Llama (Meta format) with a sentencepiece tokenizer trained on `text`.

    overrides change the model shape (dim, n_layers, n_heads, n_kv_heads, vocab_size, ...).
    """
    out = Path(out)
    text = Path(text) if text else DEFAULT_TEXT
    if not text.is_file():
        raise SlowllamaError(f"{text}: training text for the tokenizer not found (pass --text FILE)")
    read_text(text)  # UTF-8, not empty
    check_destination(out, "model", force)
    params = {**PRESETS["tiny"], **overrides}
    args = args_from_params(params, "tiny model")
    if shards < 1:
        raise SlowllamaError(f"--shards: must be at least 1, got {shards}")
    for key, shape in expected_shapes(args).items():
        dim = meta_split_dim(key, args) if shards > 1 else None
        if dim is not None and shape[dim] % shards:
            raise SlowllamaError(f"--shards {shards}: {key!r} of size {shape[dim]} along dim {dim} does not "
                                 f"split into {shards} equal parts")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    tmp.chmod(0o755)
    try:
        train_tokenizer(text, tmp / "tokenizer", args.vocab_size)
        os.replace(tmp / "tokenizer.model", tmp / "tokenizer.model.tmp")
        (tmp / "tokenizer.vocab").unlink(missing_ok=True)
        os.replace(tmp / "tokenizer.model.tmp", tmp / "tokenizer.model")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        save_meta_shards(random_state_dict(args, seed), args, tmp, shards, dtype_from_name(dtype, "--dtype"))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
