"""The `slowllama` command: argparse subcommands generated from the settings dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from pathlib import Path
from typing import Optional

from slowllama.config_file import read_config, setting_type
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
    return cls(**values)


def log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def run_command(command: str, s) -> int:
    """Run one command with its settings; returns the exit code."""
    if command == "init-tiny":
        from slowllama.formats.tiny import write_tiny

        out = write_tiny(Path(s.out), text=s.text, shards=s.shards, dtype=s.dtype, seed=s.seed, force=s.force,
                         n_layers=s.layers, dim=s.dim)
        log(f"wrote a tiny random Llama to {out}")
    elif command == "prepare":
        from slowllama.formats.convert import prepare

        out = prepare(Path(s.src), Path(s.store), dtype=s.dtype, force=s.force, log=log)
        log(f"prepared store {out}")
    elif command == "export":
        from slowllama.formats.convert import export

        out = export(Path(s.store), Path(s.out), format=s.format, shards=s.shards, max_shard_size=s.max_shard_size,
                     dtype=s.dtype, force=s.force, log=log)
        log(f"exported {s.store} to {out}")
    elif command == "fuse":
        from slowllama.commands.convert import fuse

        if not s.adapter_path:
            raise SlowllamaError("--adapter-path: required (the LoRA adapter folder to merge in)")
        out = fuse(Path(s.store), Path(s.out), Path(s.adapter_path), shards=s.shards, dtype=s.dtype,
                   force=s.force, log=log)
        log(f"wrote {s.store} with the adapters of {s.adapter_path} merged in to {out}")
    elif command == "eval":
        from slowllama.commands.evaluate import run_eval

        result = run_eval(s, log)
        if s.json:
            emit_json(result)
        else:
            print(f"eval_loss {result['eval_loss']:.6f}  eval_ppl {result['eval_ppl']:.4f}  tokens {result['tokens']}")
    elif command == "generate":
        from slowllama.commands.generate import generate_command

        generate_command(s, log)
    elif command == "finetune":
        from slowllama.commands.finetune import finetune

        finetune(s, log, emit_json if s.json else (lambda m: None))
    elif command == "plot":
        from slowllama.commands.plot import plot_command

        log(f"wrote {plot_command(s, log)}")
    elif command == "verify":
        from slowllama.commands.verify import verify_store

        summary = verify_store(Path(s.store), log=print)
        if s.json:
            emit_json(summary)
    elif command == "bench":
        from slowllama.commands.bench import bench

        bench(s, log)
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
    except OSError as e:  # a full disk outside the paths that say so themselves
        if debug or e.errno != errno.ENOSPC:
            raise
        print(f"slowllama {ns.command}: error: {e.filename or ''}: disk full ({e.strerror})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
