"""Ctrl-C and SIGTERM during a run: finish the step in progress, commit it, then stop."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Optional


class StopNow(KeyboardInterrupt):
    def __init__(self, code: int):
        super().__init__()
        self.code = code


class StopRequest:
    """SIGINT / SIGTERM: finish the step in progress, then stop with 130 / 143; a second one stops at once."""

    def __init__(self, log: Callable[[str], None] = print):
        self.signum: Optional[int] = None
        self.log = log

    def __call__(self, signum, frame):
        code = 130 if signum == signal.SIGINT else 143
        if self.signum is not None:  # the second: stop now, rolling the step in progress back
            raise StopNow(code)
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: stopping once the step in progress is committed "
                 "(send it again to stop at once, losing that step)")

    @contextmanager
    def installed(self):
        old = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class StoppedBySignal(SystemExit):
    pass
