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

from slowllama import __version__
from slowllama.config_file import check_numbers, read_config, setting_type
from slowllama.errors import SlowllamaError
from slowllama.settings import COMMANDS, GROUPS


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other slowllama error."""

    def error(self, message):
        missing = "the following arguments are required: "
        if message.startswith(missing):  # what the -c/--config file could have given
            message = f"{message[len(missing):]}: required (on the command line, or in a -c/--config file)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_text(f: dataclasses.Field) -> str:
    """The default as --help shows it; a help text that explains a None default already says it."""
    if f.metadata.get("required"):
        return " (required)"
    if f.default is None:
        return "" if "default" in f.metadata.get("help", "") else " (default: none)"
    if isinstance(f.default, bool):
        return f" (default: {'on' if f.default else 'off'})"
    return f" (default: {f.default})"


def add_settings_arguments(parser: argparse.ArgumentParser, cls, config_given: bool = False) -> None:
    """The settings of cls as arguments of parser, in GROUPS where the fields name one.

    Required settings (positional arguments, --data, ...) are required unless a -c/--config file is
    given, which may hold them (settings_from checks they are given either way)."""
    groups = {}
    for key, title in GROUPS.items():
        if any(f.metadata.get("group") == key for f in dataclasses.fields(cls)):
            groups[key] = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        typ = setting_type(cls, f)
        kwargs = dict(help=meta.get("help", ""))
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name.upper(), type=typ, nargs="?" if config_given else None,
                                default=argparse.SUPPRESS,
                                help=f"{kwargs['help']} (required: here, or as {f.name} = ... in the -c/--config "
                                "file)", **({"choices": kwargs["choices"]} if "choices" in kwargs else {}))
            continue
        where = groups.get(meta.get("group"), parser)
        flags = [f"--{f.name.replace('_', '-')}"] + ([meta["short"]] if meta.get("short") else [])
        if typ is bool:
            where.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               dest=f.name, help=kwargs["help"] + default_text(f))
        else:
            where.add_argument(*flags, type=typ, default=argparse.SUPPRESS, dest=f.name,
                               required=bool(meta.get("required")) and not config_given,
                               metavar=meta.get("metavar") or (
                                   "{" + ",".join(kwargs["choices"]) + "}" if "choices" in kwargs else f.name.upper()),
                               help=kwargs["help"] + default_text(f),
                               **({"choices": kwargs["choices"]} if "choices" in kwargs else {}))
    groups.get("output", parser).add_argument(
        "-c", "--config", metavar="FILE", default=None,
        help="TOML file of settings, keys named as the flags (batch_size = 8 or batch-size = 8); "
        "the command line overrides it (default: none)")


def build_parser(config_given: bool = True) -> argparse.ArgumentParser:
    """The parser of every command. config_given=False marks the required arguments required (what
    main() does for a command line without -c/--config); True leaves them to settings_from."""
    parser = OneLineParser(prog="slowllama", description="Fine-tune Llama models larger than memory, "
                           "streaming them block by block from SSD.")
    parser.add_argument("--version", action="version", version=f"slowllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_settings_arguments(p, cls, config_given)
    return parser


def config_in(argv: list[str]) -> bool:
    """Whether a command line gives a -c/--config file."""
    return any(a in ("-c", "--config") or a.startswith("--config=") or (a.startswith("-c") and len(a) > 2)
               for a in argv)


def settings_from(cls, namespace: argparse.Namespace, command: str = ""):
    """The command's settings: dataclass defaults < config file (-c) < command line."""
    config = getattr(namespace, "config", None)
    values = read_config(Path(config), cls, command) if config else {}
    for f in dataclasses.fields(cls):
        key = f.name.upper() if f.metadata.get("positional") else f.name
        if hasattr(namespace, key):
            values[f.name] = getattr(namespace, key)
        if (f.metadata.get("positional") or f.metadata.get("required")) and values.get(f.name) is None:
            name = f.name.upper() if f.metadata.get("positional") else f"--{f.name.replace('_', '-')}"
            raise SlowllamaError(f"{name}: required (on the command line, or as {f.name} in a -c/--config file)")
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
    "split": "slowllama.commands.shares:run_split",
    "join": "slowllama.commands.shares:run_join",
    "eval": "slowllama.commands.evaluate:run",
    "generate": "slowllama.commands.generate:run",
    "finetune": "slowllama.commands.finetune:run",
    "plot": "slowllama.commands.plot:run",
    "verify": "slowllama.commands.verify:run",
    "bench": "slowllama.commands.bench:run",
    "plan": "slowllama.commands.plan:run",
}


def run_command(command: str, s) -> int:
    """Run one command with its settings; returns the exit code."""
    module, function = ENTRY_POINTS[command].split(":")
    getattr(importlib.import_module(module), function)(s, log)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(config_in(argv))
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, a usage error: main() returns the exit code
        return e.code if isinstance(e.code, int) else 2
    if ns.command is None:  # bare `slowllama`: what it does and its commands
        parser.print_help(sys.stderr)
        return 2
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
