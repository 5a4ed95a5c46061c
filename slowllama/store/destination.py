"""The one guard of every destination slowllama writes (prepare, export, fuse, adapter folders, plots).

A destination is refused, in one line, when it is, contains or lies inside a folder the command
reads (the source, the store, an adapter folder), when it lies in or holds a folder that a running
slowllama has locked, when it is a file (or a link, or a special file) where a folder belongs, and
when it exists without --force. --force replaces only a previous output of the same kind: a store
with a store, a checkpoint folder with a checkpoint folder; never a folder of anything else.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Iterable, Optional

from slowllama.errors import SlowllamaError
from slowllama.store.atomic import remove_dead_partials

# what marks a previous output of each kind (the folder holds it at its top)
KIND_MARKS = {
    "store": ("manifest.json",),
    "checkpoint": ("params.json", "config.json"),  # export and fuse: a Meta or Hugging Face folder
    "adapters": ("adapter_config.json", "slowllama_adapter.json"),  # (PEFT's, slowllama's own config)
    "model": ("params.json",),  # init-tiny
}
KIND_NAMES = {"store": "a slowllama store", "checkpoint": "a checkpoint folder (params.json or config.json)",
              "adapters": "a slowllama adapter folder", "model": "a Meta model folder"}
WALK_LIMIT = 100_000  # entries looked at for locks held inside a folder about to be replaced


def real(p) -> Path:
    return Path(os.path.realpath(p))


def overlaps(a: Path, b: Path) -> bool:
    """Whether two real paths are the same, or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def held_by(lock: Path) -> Optional[str]:
    """The pid in a lock file that a running process holds (flock), else None."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid == str(os.getpid()):
            return None  # this process's own lock
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid or "?"
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def refuse_held(out: Path, inside: bool) -> None:
    """Refuse a destination inside a folder a running slowllama holds, or (inside=True) holding one."""
    for folder in (out, *out.parents):
        pid = held_by(folder / "lock")
        if pid:
            raise SlowllamaError(f"{out}: lies in {folder}, which a running slowllama (pid {pid}) holds")
        if folder != out and (is_kind(folder, "store") or is_kind(folder, "adapters")):
            raise SlowllamaError(f"{out}: lies inside {folder}, a slowllama store or adapter folder")
    if not inside or not out.is_dir():
        return
    seen = 0
    for root, dirs, files in os.walk(out):
        seen += len(dirs) + len(files)
        if "lock" in files and held_by(Path(root) / "lock"):
            raise SlowllamaError(f"{out}: holds {root}, which a running slowllama holds")
        if Path(root) != out and {"manifest.json", *KIND_MARKS["adapters"]} & set(files):
            raise SlowllamaError(f"{out}: holds {root}, a slowllama store or adapter folder")
        if seen > WALK_LIMIT:
            raise SlowllamaError(f"{out}: a large folder that slowllama did not write; choose another destination")


def is_kind(path: Path, kind: str) -> bool:
    if kind == "store":
        return (path / "manifest.json").is_file()
    if kind == "adapters":
        return any((path / m).is_file() for m in KIND_MARKS["adapters"])
    marks = any((path / m).is_file() for m in KIND_MARKS[kind])
    return marks and not any((path / m).exists() for m in ("manifest.json", *KIND_MARKS["adapters"]))


def check_destination(out, kind: str, force: bool = False, protected: Iterable = (), reuse: bool = False) -> Path:
    """Refuse `out` as the destination of an output of `kind` (KIND_MARKS), naming why; returns it.

    protected: the folders the command reads (source, store, adapters). reuse: an existing folder of the
    same kind is written into (an adapter folder resumed), not replaced.
    """
    out = Path(out)
    if "\0" in str(out) or not str(out):
        raise SlowllamaError(f"{out!r}: not a path")
    out_real = real(out)
    for src in protected:
        if src is not None and overlaps(out_real, real(src)):
            raise SlowllamaError(f"{out}: overlaps {src}, which this command reads (choose another folder)")
    refuse_held(out_real, inside=out.is_dir() and not out.is_symlink())
    if out.is_symlink():
        raise SlowllamaError(f"{out}: a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise SlowllamaError(f"{out}: exists and is not a folder (--force replaces only a folder)")
    parent = out_real.parent
    if parent.exists() and not parent.is_dir():
        raise SlowllamaError(f"{parent}: not a folder")
    if not out.exists():
        remove_dead_partials(out)
        return out
    # (a lock file alone: a run killed before its first file; temporary names: a write cut off)
    empty = all(p.name == "lock" or p.name.endswith(".tmp") for p in out.iterdir())
    if reuse:
        if not empty and not is_kind(out, kind) and not (out / "state.json").is_file():
            raise SlowllamaError(f"{out}: not {KIND_NAMES[kind]} and not empty; give a new or empty folder")
        return out
    if not force:
        raise SlowllamaError(f"{out}: already exists (use --force to replace it)")
    if not empty and not is_kind(out, kind):
        raise SlowllamaError(f"{out}: --force replaces only {KIND_NAMES[kind]}, and this folder is not one")
    remove_dead_partials(out)
    return out


def check_output_file(out, magic: bytes = b"") -> Path:
    """A file destination (a plot): not a link, folder or special file; inside a store or an adapter folder
    only in its run folder (STORE/run/, the adapter folder itself); an existing file is replaced only if it
    starts with `magic` (a previous output of the same kind)."""
    out = Path(out)
    if out.is_symlink():
        raise SlowllamaError(f"{out}: a symbolic link; slowllama never writes through links")
    if out.exists():
        if not out.is_file():
            raise SlowllamaError(f"{out}: exists and is not a regular file")
        with open(out, "rb") as f:
            if magic and f.read(len(magic)) != magic:
                raise SlowllamaError(f"{out}: exists and is not a file slowllama wrote (not replaced)")
    out_real = real(out)
    for folder in out_real.parents:
        run_folder = folder / "run" if is_kind(folder, "store") else folder if is_kind(folder, "adapters") else None
        if run_folder is not None and out_real.parent != run_folder:
            raise SlowllamaError(f"{out}: lies inside {folder}, a store or adapter folder, outside its run folder "
                                 f"{run_folder}")
    for folder in (out_real.parent, *out_real.parent.parents):
        pid = held_by(folder / "lock")
        if pid:
            raise SlowllamaError(f"{out}: lies in {folder}, which a running slowllama (pid {pid}) holds")
    return out


RUN_FILES = ("settings.json", "metrics.jsonl", "loss.png")


def check_run_folder(folder: Path) -> None:
    """Before a run's first step: the files it writes in its run folder are regular files or absent (a link,
    FIFO or folder there is refused now, not after a step has been committed)."""
    for name in RUN_FILES:
        path = Path(folder) / name
        if path.is_symlink():
            raise SlowllamaError(f"{path}: a symbolic link; slowllama never writes through links (remove it)")
        if path.exists() and not path.is_file():
            raise SlowllamaError(f"{path}: not a regular file (a run writes its {name} here)")
