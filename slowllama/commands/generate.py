"""`slowllama generate`: print a prompt and its continuation as it is produced."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from slowllama.commands.common import adapter_state, make_engine, resolve_device
from slowllama.commands.models import hub_snapshot, is_hub_id
from slowllama.data.chat import chat_template, token_string
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
    if is_hub_id(s.store):  # a model of the local Hugging Face cache: its snapshot folder
        path = hub_snapshot(s.store)
        log(f"{s.store}: the Hugging Face cache's {path}")
    with tempfile.TemporaryDirectory(prefix="slowllama-") as tmp:
        if path.is_dir() and not (path / MANIFEST).exists() and (
                (path / "params.json").exists() or (path / "config.json").exists()):
            log(f"{path} is a checkpoint folder: preparing a temporary store")
            path = prepare(path, Path(tmp) / "store", log=log)
        store = Store.open(path)
        engine = make_engine(store, s, lora=adapter_state(store, s, resolve_device(s)[0]))
        tokenizer = load_tokenizer(store.path)
        prompt = chat_prompt(tokenizer, s.prompt, store.path) if s.chat else s.prompt
        sys.stdout.write(prompt)
        sys.stdout.flush()

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        tokens, t0 = [], time.perf_counter()
        text = generate(engine, tokenizer, prompt, s.max_new_tokens, s.temperature, s.top_p, s.seed, show,
                        tokens.append)
        seconds = time.perf_counter() - t0
        sys.stdout.write("\n")
        sys.stdout.flush()
        log(f"{len(tokens)} tokens in {seconds:.2f} s: {len(tokens) / max(seconds, 1e-9):.1f} tokens/s "
            "(the prompt's forward pass included)")
        return text


def chat_prompt(tokenizer, message: str, where: Path) -> str:
    """The user message in the model's chat template, up to the assistant's answer.

    A leading BOS string is left out: generate adds BOS as the tokenizer says (sentencepiece would
    read the string as plain characters)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SlowllamaError(f"{where}: --chat: the model has no chat template (no chat_template in its "
                             "tokenizer_config.json, no chat_template.jinja); write the prompt in its form with "
                             "--prompt alone")
    render, _, _ = chat_template(tokenizer)
    try:
        text = render([{"role": "user", "content": message}], True)
    except Exception as e:  # the template's own raise_exception, or a Jinja error
        raise SlowllamaError(f"{where}: --chat: the chat template failed ({type(e).__name__}: {e})") from None
    bos = token_string(tokenizer, "bos")
    return text[len(bos):] if bos and text.startswith(bos) else text
