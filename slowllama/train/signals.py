"""Ctrl-C, SIGTERM and SIGHUP (the terminal closed) during a run: finish the step in progress, commit
it, then stop."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Optional

# the signals that stop a run after its step, and the exit codes they give (128 + the signal)
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class StopNow(KeyboardInterrupt):
    def __init__(self, code: int):
        super().__init__()
        self.code = code


def exit_code(signum: int) -> int:
    return STOP_SIGNALS.get(signum, 128 + int(signum))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """SIGINT / SIGTERM / SIGHUP: finish the step in progress, then stop (130 / 143 / 129); a second one
    stops at once, rolling back to the last committed step.

    kept() says what a stop at once keeps (the last committed step), for the message of the first signal.
    """

    def __init__(self, log: Callable[[str], None] = print, kept: Optional[Callable[[], str]] = None):
        self.signum: Optional[int] = None
        self.log = log
        self.kept = kept

    def __call__(self, signum, frame):
        code = exit_code(signum)
        if self.signum is not None:  # the second: stop now, rolling the steps since the last commit back
            raise StopNow(code)
        self.signum = signum
        kept = self.kept() if self.kept else "the last committed step is kept"
        self.log(f"{signal.Signals(signum).name}: stopping once the step in progress is committed "
                 f"(send it again to stop at once: {kept}, what came after it is redone on the next run)")

    @contextmanager
    def installed(self):
        old = {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class StoppedBySignal(SystemExit):
    pass
