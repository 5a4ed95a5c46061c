"""All-or-nothing writes: a JSON file or a whole folder appears complete and durable, or not at all.

The store's commit, the adapter folder's saves and every export rest on these, and on a commit
never being cut in half by a Ctrl-C (signals_deferred).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from slowllama.faults import fault_point
from slowllama.store import safetensors_io as st


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj, fault: str = "") -> None:
    """Write JSON to path by tmp file + fsync + rename + fsync of the folder: all or nothing.

    fault: prefix of the fault points just before and after the rename (crash tests).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(f"{fault}.before_rename")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    if fault:
        fault_point(f"{fault}.after_rename")
    fsync_dir(path.parent)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM until the block is done (a commit is never cut in half by a Ctrl-C).

    Python runs signal handlers in the main thread between bytecodes, whichever thread the signal
    reached: swapping the handlers for a recorder holds them all.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in got:
            if callable(old[signum]):
                old[signum](signum, None)
            elif old[signum] == signal.SIG_DFL:
                signal.raise_signal(signum)


@contextlib.contextmanager
def staged_folder(out: Path):
    """A folder to write `out` into: hidden beside it, put in place only once complete and durable
    (every file fsynced, then renamed over any old `out`), removed if the writing fails."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in tmp.iterdir():
            st.fsync_file(str(p))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
