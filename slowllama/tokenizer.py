"""Tokenizers: sentencepiece's tokenizer.model (Llama 2, Code Llama, Mistral) with BOS/EOS ids."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from slowllama.errors import SlowllamaError

TOKENIZER_FILES = ("tokenizer.model",)


class Tokenizer:
    """Encode/decode text; bos_id and eos_id come from the model file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlowllamaError(f"{self.path}: tokenizer file missing")
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(str(self.path))
        except (RuntimeError, OSError):
            ok = False
        if not ok:
            raise SlowllamaError(f"{self.path}: not a sentencepiece model")
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a model or store folder."""
    folder = Path(folder)
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise SlowllamaError(f"{folder}: no tokenizer.model")
    return Tokenizer(path)


def train_tokenizer(text_file: Path, out_prefix: Path, vocab_size: int) -> Path:
    """Train a small Llama-style BPE sentencepiece model (unk 0, bos 1, eos 2, byte fallback)."""
    try:
        spm.SentencePieceTrainer.Train(
            input=str(text_file), model_prefix=str(out_prefix), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2, split_digits=True, add_dummy_prefix=True,
            normalization_rule_name="identity", max_sentence_length=1 << 16)
    except RuntimeError as e:
        raise SlowllamaError(f"{text_file}: cannot train a tokenizer of {vocab_size} tokens on it "
                             f"({str(e).split('] ')[-1][:160]})") from None
    return Path(f"{out_prefix}.model")
