"""Refusals before anything is written, and a full disk said in one line.

prepare, export, fuse, bench and finetune check the disk and their output folder up front, so that
a run that cannot finish fails before it has changed anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from slowllama.errors import SlowllamaError


def check_free_space(folder: Path, needed: int, what: str, detail: str = "") -> None:
    """Refuse before writing anything when the disk holding folder has less than `needed` bytes free."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SlowllamaError(f"{what}: not enough free disk at {probe}: needs {needed / 2**30:.2f} GiB"
                             f"{f' ({detail})' if detail else ''}, {free / 2**30:.2f} GiB free")


def check_output_folder(out: Path, force: bool, inputs: tuple = ()) -> None:
    """Refuse an output folder that exists (without --force), is not a folder, or overlaps an input folder."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise SlowllamaError(f"{out}: already exists (use --force to replace it)")
        if out.is_symlink() or not out.is_dir():
            raise SlowllamaError(f"{out}: not a folder (--force replaces only a folder)")
    real = Path(os.path.realpath(out))
    for src in inputs:
        src_real = Path(os.path.realpath(src))
        if real == src_real or src_real in real.parents or real in src_real.parents:
            raise SlowllamaError(f"{out}: overlaps {src}, which it is made from (choose another folder)")


def disk_full_error(e: OSError, what: str) -> SlowllamaError:
    """ENOSPC while writing `what`, as the one line the user sees."""
    return SlowllamaError(f"{what}: disk full ({e.strerror}); the store stays at its last committed step")
