"""JSON files read with every way they can be bad turned into one line naming the file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Optional

from slowllama.errors import SlowllamaError


def read_json(path: Path, what: Optional[str] = None) -> Any:
    """Read a JSON file, turning every way it can be bad into one line naming the file."""
    what = what or str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read, a device never end
            raise SlowllamaError(f"{what}: not a regular file")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlowllamaError(f"{what}: file not found") from None
    except UnicodeDecodeError:
        raise SlowllamaError(f"{what}: not UTF-8 text") from None
    except OSError as e:
        raise SlowllamaError(f"{what}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SlowllamaError(f"{what}: not valid JSON ({e.msg} at line {e.lineno})") from None
