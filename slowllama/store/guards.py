"""Refusals before anything is written, and a full disk said in one line.

prepare, export, fuse, bench and finetune check the disk and their output folder up front, so that
a run that cannot finish fails before it has changed anything.
"""

from __future__ import annotations

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


def disk_full_error(e: OSError, what: str) -> SlowllamaError:
    """ENOSPC while writing `what`, as the one line the user sees."""
    return SlowllamaError(f"{what}: disk full ({e.strerror}); the store stays at its last committed step")
