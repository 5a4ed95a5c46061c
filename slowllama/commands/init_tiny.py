"""`slowllama init-tiny`: a small random-weight Llama in Meta's format, to try everything on without a download."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slowllama.formats.tiny import write_tiny
from slowllama.settings import InitTinySettings


def run(s: InitTinySettings, log: Callable[[str], None]) -> None:
    out = write_tiny(Path(s.out), text=s.text, shards=s.shards, dtype=s.dtype, seed=s.seed, force=s.force,
                     n_layers=s.layers, dim=s.dim)
    log(f"wrote a tiny random Llama to {out}")
