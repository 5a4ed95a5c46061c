"""`slowllama generate`: print a prompt and its continuation as it is produced."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from slowllama.commands.common import adapter_state, make_engine, resolve_device
from slowllama.engine.generation import generate
from slowllama.errors import SlowllamaError
from slowllama.formats.convert import prepare
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import GenerateSettings
from slowllama.store.manifest import MANIFEST
from slowllama.store.store import Store


def run(s: GenerateSettings, log) -> str:
    """`slowllama generate`: print the prompt and its continuation as it is produced.

    STORE may also be a Meta or Hugging Face folder: it is then prepared into a temporary store first.
    """
    if s.max_new_tokens < 0:
        raise SlowllamaError(f"--max-new-tokens: must be >= 0, got {s.max_new_tokens}")
    if not 0 < s.top_p <= 1:
        raise SlowllamaError(f"--top-p: must be in (0, 1], got {s.top_p}")
    if not 0 <= s.temperature < float("inf"):
        raise SlowllamaError(f"--temperature: must be a number >= 0 (0: greedy), got {s.temperature}")
    path = Path(s.store)
    with tempfile.TemporaryDirectory(prefix="slowllama-") as tmp:
        if path.is_dir() and not (path / MANIFEST).exists() and (
                (path / "params.json").exists() or (path / "config.json").exists()):
            log(f"{path} is a checkpoint folder: preparing a temporary store")
            path = prepare(path, Path(tmp) / "store", log=log)
        store = Store.open(path)
        engine = make_engine(store, s, lora=adapter_state(store, s, resolve_device(s)[0]))
        tokenizer = load_tokenizer(store.path)
        sys.stdout.write(s.prompt)
        sys.stdout.flush()

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        text = generate(engine, tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_p, s.seed, show)
        sys.stdout.write("\n")
        return text
