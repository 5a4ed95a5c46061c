"""-c/--config FILE: a command's settings from a TOML file, checked against its settings dataclass.

Keys are the settings' names (batch_size, or batch-size as on the command line); values have the
setting's type (TOML has no null: leave a key out for its default). Precedence: the dataclass
defaults < the file < the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path

from slowllama.errors import SlowllamaError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package
    import tomli as tomllib

TOML_TYPE = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


def setting_type(cls, f: dataclasses.Field) -> type:
    """bool, int, float or str: the type of a setting, Optional[...] unwrapped."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def check_value(where: str, key: str, value, typ: type, choices):
    """The value converted to the setting's type, or an error naming the file and key."""
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise SlowllamaError(f"{where}: {key} must be {TOML_TYPE[typ]}, got {type(value).__name__} {value!r}")
    if typ is float and not math.isfinite(value):
        raise SlowllamaError(f"{where}: {key} must be a finite number, got {value!r}")
    if choices and value not in choices:
        raise SlowllamaError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_numbers(settings) -> None:
    """Every number of a command's settings finite (a NaN or inf flag turns into NaN losses or endless loops)."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SlowllamaError(f"--{f.name.replace('_', '-')}: must be a finite number, got {value}")


def read_config(path: Path, cls, command: str) -> dict:
    """The settings in a TOML file, by field name, type-checked; unknown keys are errors."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end
            raise SlowllamaError(f"{path}: not a regular file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SlowllamaError(f"{path}: config file not found") from None
    except OSError as e:
        raise SlowllamaError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SlowllamaError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise SlowllamaError(f"{path}: not valid TOML ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SlowllamaError(f"{path}: unknown key {key!r}: not a setting of `slowllama {command}`{hint}")
        if name in values:
            raise SlowllamaError(f"{path}: {name} is given twice (as {name} and {name.replace('_', '-')})")
        f = fields[name]
        values[name] = check_value(f"{path}", key, value, setting_type(cls, f), f.metadata.get("choices"))
    return values
