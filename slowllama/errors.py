"""The one exception type for errors a user can cause (bad files, bad flags, full disks)."""


class SlowllamaError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits non-zero, no traceback."""

    exit_code = 2


def fail(message: str) -> "NoReturn":  # noqa: F821
    raise SlowllamaError(message)
