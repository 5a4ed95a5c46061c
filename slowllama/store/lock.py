"""One writer per store (or adapter folder), and readers kept away from a store being written.

An exclusive flock on FOLDER/lock, with the owner's pid in it for messages: the kernel drops the
lock when its process dies, so a lock left by a crash is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable, Optional

from slowllama.errors import SlowllamaError


class StoreLock:
    """One writer per store: an exclusive flock on STORE/lock, with the owner's pid in it for messages."""

    def __init__(self, folder: Path):
        self.path = folder / "lock"
        self.fd: Optional[int] = None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock, or refuse naming the pid that holds it; a dead owner's lock is taken over."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise SlowllamaError(f"{self.path}: cannot open the lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SlowllamaError(f"{self.path.parent}: in use by another slowllama process (pid {pid})") from None
        old = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if old and old != str(os.getpid()):
            log(f"taking over the lock of pid {old}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Give the lock up (its file stays, empty)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def held_by(self, pid: int) -> bool:
        """Whether the lock is held, by the process `pid` says it is (another rank of a finetune asks whether it sees
        the very store folder that rank `pid` locked, not a copy of it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False  # nobody holds it
        except BlockingIOError:
            return owner == str(pid)
        except OSError:
            return False
        finally:
            os.close(fd)

    def refuse_if_written(self) -> None:
        """Readers: refuse a store that another process is writing (its files change at every step)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file: nobody ever wrote this store
        try:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if pid == str(os.getpid()):
                return  # this process writes it (eval and generation inside finetune)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlowllamaError(f"{self.path.parent}: a finetune (pid {pid or '?'}) is writing this store; "
                                 "read it when that run has stopped") from None
        except OSError:
            return  # not a lock file a writer could hold (verify reports a lock that is not a file)
        finally:
            os.close(fd)
