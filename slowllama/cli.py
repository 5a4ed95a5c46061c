"""The `slowllama` command: argparse subcommands generated from the settings dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from slowllama.config_file import check_numbers, read_config, setting_type
from slowllama.errors import SlowllamaError
from slowllama.settings import COMMANDS


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other slowllama error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_text(f: dataclasses.Field) -> str:
    """The default as --help shows it; a help text that explains a None default already says it."""
    if f.default is None:
        return "" if "default" in f.metadata.get("help", "") else " (default: none)"
    if isinstance(f.default, bool):
        return f" (default: {'on' if f.default else 'off'})"
    return f" (default: {f.default})"


def add_settings_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        meta = f.metadata
        typ = setting_type(cls, f)
        kwargs = dict(help=meta.get("help", ""))
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            # optional here so that a config file can give it; settings_from checks it is given
            parser.add_argument(f.name.upper(), type=typ, nargs="?", default=argparse.SUPPRESS,
                                help=f"{kwargs['help']} (or {f.name} = ... in the -c/--config file)",
                                **({"choices": kwargs["choices"]} if "choices" in kwargs else {}))
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ([meta["short"]] if meta.get("short") else [])
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                dest=f.name, help=kwargs["help"] + default_text(f))
        else:
            parser.add_argument(*flags, type=typ, default=argparse.SUPPRESS, dest=f.name,
                                metavar=meta.get("metavar") or (
                                    "{" + ",".join(kwargs["choices"]) + "}" if "choices" in kwargs else f.name.upper()),
                                help=kwargs["help"] + default_text(f),
                                **({"choices": kwargs["choices"]} if "choices" in kwargs else {}))
    parser.add_argument("-c", "--config", metavar="FILE", default=None,
                        help="TOML file of settings, keys named as the flags (batch_size = 8 or batch-size = 8); "
                        "the command line overrides it (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="slowllama", description="Fine-tune Llama models larger than memory, "
                           "streaming them block by block from SSD.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_settings_arguments(p, cls)
    return parser


def settings_from(cls, namespace: argparse.Namespace, command: str = ""):
    """The command's settings: dataclass defaults < config file (-c) < command line."""
    config = getattr(namespace, "config", None)
    values = read_config(Path(config), cls, command) if config else {}
    for f in dataclasses.fields(cls):
        key = f.name.upper() if f.metadata.get("positional") else f.name
        if hasattr(namespace, key):
            values[f.name] = getattr(namespace, key)
        if f.metadata.get("positional") and values.get(f.name) is None:
            raise SlowllamaError(f"{f.name.upper()}: required (on the command line, or as {f.name} in a "
                                 "-c/--config file)")
    settings = cls(**values)
    check_numbers(settings)
    return settings


def log(message: str) -> None:
    """Information and progress lines: on stderr, above any progress bar."""
    tqdm.write(message, file=sys.stderr)


# each command's entry point, run(settings, log): imported when the command runs, since building the
# parser (--help) needs none of them
ENTRY_POINTS = {
    "init-tiny": "slowllama.commands.init_tiny:run",
    "prepare": "slowllama.commands.convert:run_prepare",
    "export": "slowllama.commands.convert:run_export",
    "fuse": "slowllama.commands.convert:run_fuse",
    "eval": "slowllama.commands.evaluate:run",
    "generate": "slowllama.commands.generate:run",
    "finetune": "slowllama.commands.finetune:run",
    "plot": "slowllama.commands.plot:run",
    "verify": "slowllama.commands.verify:run",
    "bench": "slowllama.commands.bench:run",
}


def run_command(command: str, s) -> int:
    """Run one command with its settings; returns the exit code."""
    module, function = ENTRY_POINTS[command].split(":")
    getattr(importlib.import_module(module), function)(s, log)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls = COMMANDS[ns.command][0]
    debug = getattr(ns, "debug", False)
    try:
        s = settings_from(cls, ns, ns.command)
        debug = getattr(s, "debug", debug)
        return run_command(ns.command, s)
    except SlowllamaError as e:
        if debug:
            raise
        print(f"slowllama {ns.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"slowllama {ns.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # permissions, a read-only disk, a full one, a file where a folder belongs ...: the path
        if debug:
            raise
        what = "disk full" if e.errno == errno.ENOSPC else "cannot read or write"
        where = e.filename or "(unnamed file)"
        print(f"slowllama {ns.command}: error: {where}: {what} ({e.strerror or e})", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print(f"slowllama {ns.command}: error: out of memory (an input larger than this machine's memory?)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
