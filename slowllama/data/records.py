"""JSON-lines training records: {"text"}, {"prompt", "completion"} or chat {"messages": [...]}.

Each non-blank line is one record; its format is decided by its fields (other fields, such as an
"id", are ignored). A bad line is an error naming file:line, or with skip_bad_lines it is left out
and counted.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from slowllama.errors import SlowllamaError

ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    kind: str  # "text", "completion" or "chat"
    where: str  # "file:line", for messages about this record
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: list[dict] = field(default_factory=list)  # [{"role", "content"}], roles in ROLES


def read_text(path: Path) -> str:
    """A data file's text (UTF-8, not empty)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):  # /dev/zero never ends
            raise SlowllamaError(f"{path}: a device or socket, not a data file")
        raw = path.read_bytes()  # (a FIFO is read to its end: --data <(command) works)
    except FileNotFoundError:
        raise SlowllamaError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise SlowllamaError(f"{path}: is a folder, not a data file") from None
    except OSError as e:
        raise SlowllamaError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SlowllamaError(f"{path}: not UTF-8 text (bad byte at offset {e.start}, line {line})") from None
    if not text.strip():
        raise SlowllamaError(f"{path}: empty data file")
    return text


class BadLine(ValueError):
    pass


def _string(obj: dict, key: str, where: str = "") -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise BadLine(f"{where}'{key}' must be a string, got {type(value).__name__}")
    return value


def parse_messages(value) -> list[dict]:
    """Validate a chat: a non-empty list of {"role", "content"} with at least one assistant turn."""
    if not isinstance(value, list) or not value:
        raise BadLine("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]: "
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadLine(f"{where}must be an object with 'role' and 'content'")
        role = _string(m, "role", where)
        if role not in ROLES:
            raise BadLine(f"{where}role {role!r} is not one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _string(m, "content", where)})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadLine("the chat has no assistant turn (nothing to train on)")
    return messages


def parse_record(obj, where: str) -> Record:
    """One decoded JSON line as a Record; BadLine says what is wrong with it."""
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object (got {type(obj).__name__})")
    present = [k for k in ("text", "prompt", "completion", "messages") if k in obj]
    if present == ["text"]:
        return Record("text", where, text=_string(obj, "text"))
    if present == ["prompt", "completion"]:
        return Record("completion", where, prompt=_string(obj, "prompt"), completion=_string(obj, "completion"))
    if present == ["messages"]:
        return Record("chat", where, messages=parse_messages(obj["messages"]))
    if not present:
        raise BadLine("has none of the fields 'text', 'prompt'+'completion', 'messages'")
    if present in (["prompt"], ["completion"]):
        missing = "completion" if present == ["prompt"] else "prompt"
        raise BadLine(f"has '{present[0]}' but no '{missing}'")
    raise BadLine(f"has fields of several formats ({', '.join(present)}); use one of 'text', "
                  "'prompt'+'completion', 'messages'")


def read_records(path: Path, text: str, skip_bad_lines: bool = False,
                 notes: Optional[list[str]] = None) -> list[Record]:
    """The records of a .jsonl file's text; a bad line raises SlowllamaError naming path:line unless skipped.

    notes receives the line to log about skipped lines (the caller logs it once the data is usable).
    """
    records, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadLine(f"not JSON ({e.msg} at column {e.colno})") from None
            records.append(parse_record(obj, where))
        except BadLine as e:
            if not skip_bad_lines:
                raise SlowllamaError(f"{where}: {e} (--skip-bad-lines leaves such lines out)") from None
            bad.append(f"line {number}: {e}")
    if bad and notes is not None:
        notes.append(f"{path}: skipped {len(bad)} bad line{'s' if len(bad) > 1 else ''} (first: {bad[0]})")
    if not records:
        raise SlowllamaError(f"{path}: no usable records" + (f" ({len(bad)} bad lines skipped)" if bad else ""))
    return records
