"""Fault injection for crash tests: kill the process, raise an error or send a signal at a named point
(the points of slowllama/faults.py).

A spec "point:N[:action],..." acts the N-th time (1-based, counted per process) the code reaches
`fault_point("point")`. Actions:
    kill     SIGKILL this process (default): a crash at that exact instant
    enospc   raise OSError(ENOSPC), as a full disk would
    fill     fill the disk: write zeros to the file $SLOWLLAMA_FAULT_FILL until the disk is full
    sigint   send SIGINT to this process (a Ctrl-C), sigterm and sighup likewise
    wait     print "fault: waiting at POINT" on stderr and wait for a signal
In a test's own process, `configure(spec)` arms them. For a subprocess,
`python -m slowllama.testing.faults ARGS...` arms the spec of $SLOWLLAMA_FAULTS and runs
`slowllama ARGS...`; under torchrun (`-m slowllama.testing.faults` in place of `-m slowllama`),
SLOWLLAMA_FAULTS_RANK=R arms them in rank R alone.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import Optional

from slowllama import cli, faults

ENV = "SLOWLLAMA_FAULTS"
ACTIONS = ("kill", "enospc", "fill", "sigint", "sigterm", "sighup", "wait")


def parse(spec: str) -> dict[tuple[str, int], str]:
    """'a:3,b:1:enospc' -> {('a', 3): 'kill', ('b', 1): 'enospc'}."""
    plan = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, count, *action = item.split(":")
        action = action[0] if action else "kill"
        if action not in ACTIONS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}: cannot read {item!r} (expected point:N[:{'|'.join(ACTIONS)}])")
        plan[(name, int(count))] = action
    return plan


def configure(spec: str) -> None:
    """Arm the faults of `spec` in this process, counting each point from zero; an empty spec disarms them."""
    plan = parse(spec)
    counts: dict[str, int] = {}

    def hook(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        action = plan.get((name, counts[name]))
        if action:
            act(action, name)

    faults.hook = hook if plan else None


def configure_from_environment() -> None:
    """Arm the faults of $SLOWLLAMA_FAULTS; under torchrun only in rank $SLOWLLAMA_FAULTS_RANK if it is set."""
    rank = os.environ.get("RANK", "0")
    if os.environ.get(ENV + "_RANK", rank) == rank:
        configure(os.environ.get(ENV, ""))


def act(action: str, name: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"fault at {name}")
    elif action == "fill":
        fill_disk(os.environ["SLOWLLAMA_FAULT_FILL"])
    elif action in ("sigint", "sigterm", "sighup"):
        os.kill(os.getpid(), {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP}[action])
    elif action == "wait":
        wait_for_signal(name)


def wait_for_signal(name: str) -> None:
    """Say so on stderr, then wait until SIGINT or SIGTERM has reached this process's own handler."""
    got = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def note(signum, frame):
        got.append(signum)
        handler = old[signum]
        if callable(handler):
            handler(signum, frame)

    for sig in old:
        signal.signal(sig, note)
    try:
        print(f"fault: waiting at {name}", file=sys.stderr, flush=True)
        while not got:  # handlers run in the main thread, between two of these sleeps
            time.sleep(0.01)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def fill_disk(path: str) -> None:
    """Append zeros to `path` until the disk holding it has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = bytes(size)
            try:
                while True:
                    os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def main(argv: Optional[list[str]] = None) -> int:
    """slowllama's command line with the faults of $SLOWLLAMA_FAULTS armed."""
    configure_from_environment()
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
