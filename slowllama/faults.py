"""Fault injection for crash tests: kill the process, raise an error or send a signal at a named point.

SLOWLLAMA_FAULTS="point:N[:action],..." acts the N-th time (1-based, counted per process) the code
reaches `fault_point("point")`. Actions:
    kill     SIGKILL this process (default): a crash at that exact instant
    enospc   raise OSError(ENOSPC), as a full disk would
    fill     fill the disk: write zeros to the file $SLOWLLAMA_FAULT_FILL until the disk is full
    sigint   send SIGINT to this process (a Ctrl-C), sigterm likewise
    wait     print "fault: waiting at POINT" on stderr and wait for a signal
The points: forward.module / backward.module (before each module of a pass), store.write.before /
store.write.after (each module file), store.begin_step (journal written), store.commit.before_rename /
store.commit.after_rename (the manifest's replacement).
Unset (the normal case), fault_point returns at once. Under torchrun, SLOWLLAMA_FAULTS_RANK=R arms
the faults in rank R alone.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

ENV = "SLOWLLAMA_FAULTS"
ACTIONS = ("kill", "enospc", "fill", "sigint", "sigterm", "wait")


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


_plan: dict[tuple[str, int], str] = {}
_counts: dict[str, int] = {}


def configure(spec: str) -> None:
    """Arm the faults of `spec` in this process (tests); an empty spec disarms them."""
    global _plan
    _plan = parse(spec)
    _counts.clear()


def fault_point(name: str) -> None:
    """Called at the points named above; does nothing unless a fault is armed."""
    if _plan:
        _counts[name] = _counts.get(name, 0) + 1
        action = _plan.get((name, _counts[name]))
        if action:
            act(action, name)


def act(action: str, name: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"fault at {name}")
    elif action == "fill":
        fill_disk(os.environ["SLOWLLAMA_FAULT_FILL"])
    elif action in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
    elif action == "wait":
        wait_for_signal(name)


def wait_for_signal(name: str) -> None:
    """Say so on stderr, then wait until SIGINT or SIGTERM has reached this process's own handler."""
    got = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

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


if os.environ.get(ENV + "_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
    configure(os.environ.get(ENV, ""))
