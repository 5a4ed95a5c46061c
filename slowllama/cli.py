"""The `slowllama` command: argparse subcommands generated from the settings dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Callable, Optional

from slowllama.errors import SlowllamaError
from slowllama.settings import COMMANDS


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other slowllama error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_settings_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        meta = f.metadata
        typ = _field_type(cls, f)
        kwargs = dict(help=meta.get("help", ""))
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name.upper(), type=typ, **kwargs)
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ([meta["short"]] if meta.get("short") else [])
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                dest=f.name, help=f"{kwargs['help']} (default: {'on' if f.default else 'off'})")
        else:
            parser.add_argument(*flags, type=typ, default=argparse.SUPPRESS, dest=f.name,
                                metavar=meta.get("metavar") or f.name.upper(),
                                help=f"{kwargs['help']} (default: {f.default})",
                                **({"choices": kwargs["choices"]} if "choices" in kwargs else {}))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="slowllama", description="Fine-tune Llama models larger than memory, "
                           "streaming them block by block from SSD.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_settings_arguments(p, cls)
    return parser


def settings_from(cls, namespace: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        key = f.name.upper() if f.metadata.get("positional") else f.name
        if hasattr(namespace, key):
            values[f.name] = getattr(namespace, key)
    return cls(**values)


def log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def run_command(command: str, s) -> int:
    """Run one command with its settings; returns the exit code."""
    if command == "init-tiny":
        from slowllama.tiny import write_tiny

        out = write_tiny(Path(s.out), text=s.text, shards=s.shards, dtype=s.dtype, seed=s.seed, force=s.force,
                         n_layers=s.layers, dim=s.dim)
        log(f"wrote a tiny random Llama to {out}")
    elif command == "prepare":
        from slowllama.loader import prepare_meta

        out = prepare_meta(Path(s.src), Path(s.store), dtype=s.dtype, force=s.force, log=log)
        log(f"prepared store {out}")
    elif command == "export":
        from slowllama.loader import export_meta

        out = export_meta(Path(s.store), Path(s.out), shards=s.shards, dtype=s.dtype, force=s.force, log=log)
        log(f"exported {s.store} to {out}")
    elif command == "eval":
        from slowllama.train import run_eval

        result = run_eval(s, log)
        if s.json:
            emit_json(result)
        else:
            print(f"eval_loss {result['eval_loss']:.6f}  eval_ppl {result['eval_ppl']:.4f}  tokens {result['tokens']}")
    elif command == "generate":
        from slowllama.generate import generate_command

        generate_command(s, log)
    elif command == "finetune":
        from slowllama.train import finetune

        finetune(s, log, emit_json if s.json else (lambda m: None))
    elif command == "bench":
        from slowllama.bench import bench

        bench(s, log)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls = COMMANDS[ns.command][0]
    debug = getattr(ns, "debug", False)
    try:
        s = settings_from(cls, ns)
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


if __name__ == "__main__":
    sys.exit(main())
