"""Files created so that no write follows a link or lands in a special file, and reads that refuse
what is not a regular file (a FIFO would block a read forever, /dev/zero would fill memory).

Every name slowllama writes (temporary or final, in a store, an adapter folder or a run folder) is
created here: the old name is removed first (unlinking a link removes the link, never its target),
then the file is created with O_EXCL | O_NOFOLLOW, so a link planted in between is refused too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from slowllama.errors import SlowllamaError

NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def os_error(path, e: OSError, doing: str = "cannot write") -> SlowllamaError:
    """An OSError about `path` as the one line the user sees."""
    if e.errno == errno.ELOOP:
        return SlowllamaError(f"{path}: a symbolic link; slowllama never writes through links (remove it)")
    return SlowllamaError(f"{path}: {doing} ({e.strerror or e})")


def create_file(path, mode: int = 0o644) -> int:
    """A new, empty regular file at path (whatever was there removed, a folder refused); returns its fd."""
    path = str(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as e:
        raise os_error(path, e) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise SlowllamaError(f"{path}: a folder where slowllama writes a file")
    try:
        if info is not None:
            os.unlink(path)
        return os.open(path, NEW, mode)
    except OSError as e:
        raise os_error(path, e) from None


def open_new(path, mode: str = "wb"):
    """create_file() as a file object ("wb", or "w" for UTF-8 text)."""
    fd = create_file(path)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def open_append(path):
    """A regular file opened to append text (created if missing); a link or special file is refused."""
    try:
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise os_error(path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SlowllamaError(f"{path}: not a regular file (slowllama appends to a file here)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def check_regular(path, what: str = "") -> None:
    """Refuse to read a path that is not a regular file (links are followed: reading through one is harmless)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SlowllamaError(f"{path}: {what or 'file'} not found") from None
    except OSError as e:
        raise os_error(path, e, "cannot read") from None
    if stat.S_ISDIR(mode):
        raise SlowllamaError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise SlowllamaError(f"{path}: not a regular file (a FIFO, socket or device)")


def write_text_new(path: Path, text: str) -> None:
    """Write a small text file as a new file (see create_file)."""
    with open_new(path, "w") as f:
        f.write(text)
