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
from slowllama.store.safe_files import open_new


# the signals a commit holds back: Ctrl-C, SIGTERM, and SIGHUP (the terminal closed)
HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
        with open_new(tmp, "w") as f:  # a link planted at the temporary name is removed, never followed
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
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in HELD}
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


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_dead_partials(out: Path) -> list[Path]:
    """Remove the hidden folders beside `out` (.OUT.partial-PID, .fused-PID, .old-PID) that a killed
    process left: those whose pid is not running (they would block every retry for lack of space)."""
    removed = []
    parent = Path(out).parent
    if not parent.is_dir():
        return removed
    for p in parent.glob(f".{Path(out).name}.*-*"):
        stem, _, pid = p.name.rpartition("-")
        if stem.rpartition(".")[2] in ("partial", "fused", "old") and pid.isdigit() and int(pid) != os.getpid() \
                and not pid_running(int(pid)):
            if p.is_symlink() or not p.is_dir():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path):
    """A folder to write `out` into: hidden beside it, put in place only once complete and durable
    (every file fsynced, then renamed over any old `out`), removed if the writing fails."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    remove_dead_partials(out)
    if tmp.is_symlink():
        tmp.unlink()
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
