"""Tokenizers with BOS/EOS ids: sentencepiece's tokenizer.model (Llama 2, Code Llama, Mistral) and
Hugging Face's tokenizer.json (Llama 3; through the optional `tokenizers` package).

Both expose encode(text, bos, eos), encode_text(text) (BOS / EOS as the tokenizer's config says),
decode(ids), stream(prompt_ids) (the text of new tokens as they come, spacing kept), bos_id, eos_id,
add_bos, add_eos, vocab_size, stop_ids (every id that ends a generation) and chat_template
(tokenizer_config.json's template string, or None).
BOS/EOS come from the folder's tokenizer_config.json, special_tokens_map.json, generation_config.json
and config.json, in that order, where they name them; otherwise from the tokenizer model itself.
Whether plain text gets them (add_bos / add_eos): tokenizer_config.json's add_bos_token /
add_eos_token where it has them; else a sentencepiece model adds BOS (if it has one) and no EOS, as
transformers' LlamaTokenizer does, and a tokenizer.json adds what its own post-processor adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import sentencepiece as spm

from slowllama.errors import SlowllamaError
from slowllama.jsonfile import read_json

# the files that make up a tokenizer; prepare copies those present into the store, export copies them back
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@dataclass
class SpecialTokens:
    """What a folder's JSON files say about BOS / EOS and the chat template."""

    bos_token: Optional[str] = None  # a token string to look up in the vocabulary
    eos_token: Optional[str] = None
    bos_ids: list[int] = field(default_factory=list)  # ids given as numbers (generation_config / config.json)
    eos_ids: list[int] = field(default_factory=list)
    chat_template: Optional[str] = None
    add_bos: Optional[bool] = None  # tokenizer_config.json's add_bos_token / add_eos_token, where given
    add_eos: Optional[bool] = None
    sources: dict = field(default_factory=dict)  # which file each value came from, for messages


def _read(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise SlowllamaError(f"{path}: expected a JSON object")
    return data


def _token_text(value, path: Path, name: str) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # transformers' AddedToken
        return value["content"]
    raise SlowllamaError(f"{path}: field {name!r} must be a token string, got {value!r}")


def _ids(value, path: Path, name: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if value is None:
        return []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SlowllamaError(f"{path}: field {name!r} must be a token id or a list of ids, got {value!r}")
    return values


def read_special_tokens(folder: Path) -> SpecialTokens:
    """BOS / EOS and the chat template from a model folder's JSON files (all optional)."""
    folder = Path(folder)
    out = SpecialTokens()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read(folder / name) or {}
        for which in ("bos", "eos"):
            text = _token_text(data.get(f"{which}_token"), folder / name, f"{which}_token")
            if text is not None and getattr(out, f"{which}_token") is None:
                setattr(out, f"{which}_token", text)
                out.sources[which] = folder / name
        if name == "tokenizer_config.json":
            out.chat_template = _chat_template(data.get("chat_template"), folder / name)
            for which in ("bos", "eos"):
                flag = data.get(f"add_{which}_token")
                if flag is not None and not isinstance(flag, bool):
                    raise SlowllamaError(f"{folder / name}: field 'add_{which}_token' must be true or false, "
                                         f"got {flag!r}")
                setattr(out, f"add_{which}", flag)
    for name in ("generation_config.json", "config.json"):
        data = _read(folder / name) or {}
        for which in ("bos", "eos"):
            ids = _ids(data.get(f"{which}_token_id"), folder / name, f"{which}_token_id")
            if ids and not getattr(out, f"{which}_ids"):
                setattr(out, f"{which}_ids", ids)
                out.sources.setdefault(f"{which}_ids", folder / name)
    if out.chat_template is None and (folder / "chat_template.jinja").is_file():
        out.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return out


def _chat_template(value, path: Path) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise SlowllamaError(f"{path}: field 'chat_template' must be a string (or a list with a 'default' template)")


class TextStream:
    """The text of generated tokens as they come: decode(prompt + new) minus decode(prompt).

    Decoding the new tokens on their own would lose what depends on the tokens before them
    (sentencepiece drops the leading-space marker of a text's first piece). A trailing U+FFFD is
    held back: it is an incomplete UTF-8 character (byte-fallback tokens) that the next token completes.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.prompt_ids = tokenizer, [int(i) for i in prompt_ids]
        self.head = tokenizer.decode(self.prompt_ids)
        self.new_ids: list[int] = []
        self.shown = ""

    def text(self) -> str:
        """The text of all new tokens so far (decode(prompt + new) minus decode(prompt))."""
        full = self.tokenizer.decode(self.prompt_ids + self.new_ids)
        if full.startswith(self.head):
            return full[len(self.head):]
        n = 0  # a decoder that rewrote the prompt's end (cleanup of spaces): cut at the common prefix
        while n < min(len(full), len(self.head)) and full[n] == self.head[n]:
            n += 1
        return full[n:]

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that can be shown now (possibly empty)."""
        self.new_ids.append(int(token_id))
        return self._advance(self.text().rstrip("\ufffd"))

    def flush(self) -> str:
        """The rest of the text, at the end of generation (an incomplete character shown as U+FFFD)."""
        return self._advance(self.text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.shown):  # an earlier piece changed: show nothing it would contradict
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


class _Base:
    path: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    add_bos: bool
    add_eos: bool
    stop_ids: set
    chat_template: Optional[str]
    bos_token: Optional[str]
    eos_token: Optional[str]

    def _token_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def _id_token(self, i: int) -> Optional[str]:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _adds(self) -> tuple[bool, bool]:
        """Whether the tokenizer itself adds BOS / EOS to plain text, when tokenizer_config.json does not say."""
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        """The tokens of a plain text as transformers would give them: BOS / EOS added as add_bos / add_eos say."""
        return self.encode(text, bos=self.add_bos, eos=self.add_eos)

    def stream(self, prompt_ids: list[int]) -> TextStream:
        """A TextStream: the text of tokens generated after prompt_ids, piece by piece."""
        return TextStream(self, prompt_ids)

    def _resolve_specials(self, special: SpecialTokens, default_bos: Optional[int], default_eos: Optional[int]):
        """bos_id / eos_id: a named token first, then ids from generation_config / config.json, then the model's."""
        ids = {}
        for which, default in (("bos", default_bos), ("eos", default_eos)):
            text = getattr(special, f"{which}_token")
            listed = getattr(special, f"{which}_ids")
            if text is not None:
                i = self._token_id(text)
                if i is None:
                    raise SlowllamaError(f"{special.sources[which]}: {which}_token {text!r} is not in the "
                                         f"vocabulary of {self.path.name}")
            elif listed:
                i = listed[0]
            elif default is not None and default >= 0:
                i = default
            else:
                raise SlowllamaError(f"{self.path}: no {which.upper()} token (name it as {which}_token in "
                                     "tokenizer_config.json)")
            if not 0 <= i < self.vocab_size:
                raise SlowllamaError(f"{special.sources.get(f'{which}_ids', self.path)}: {which} token id {i} is "
                                     f"outside the tokenizer's {self.vocab_size} tokens")
            ids[which] = i
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.stop_ids = {self.eos_id} | {i for i in special.eos_ids if 0 <= i < self.vocab_size}
        self.chat_template = special.chat_template
        self.bos_token, self.eos_token = self._id_token(self.bos_id), self._id_token(self.eos_id)
        adds_bos, adds_eos = self._adds()
        self.add_bos = adds_bos if special.add_bos is None else special.add_bos
        self.add_eos = adds_eos if special.add_eos is None else special.add_eos


class Tokenizer(_Base):
    """sentencepiece's tokenizer.model; bos_id and eos_id from the model file unless the folder's JSON names others."""

    def __init__(self, path: Path, special: Optional[SpecialTokens] = None):
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
        self._resolve_specials(special or SpecialTokens(), self.sp.bos_id(), self.sp.eos_id())

    def _token_id(self, token: str) -> Optional[int]:
        i = self.sp.PieceToId(token)
        return i if self.sp.IdToPiece(i) == token else None

    def _id_token(self, i: int) -> Optional[str]:
        return self.sp.IdToPiece(i)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def _adds(self) -> tuple[bool, bool]:
        return self.sp.bos_id() >= 0, False  # LlamaTokenizer's defaults (add_bos_token True, add_eos_token False)


class HFTokenizer(_Base):
    """Hugging Face's tokenizer.json (Llama 3), through the `tokenizers` package.

    encode() never lets the file's post-processor add its own BOS: BOS and EOS are added only as asked.
    """

    def __init__(self, path: Path, special: Optional[SpecialTokens] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlowllamaError(f"{self.path}: tokenizer file missing")
        try:
            from tokenizers import Tokenizer as _Tokenizers
        except ImportError:
            raise SlowllamaError(f"{self.path}: reading tokenizer.json needs the 'tokenizers' package "
                                 "(pip install 'slowllama[hf]')") from None
        try:
            self.tok = _Tokenizers.from_file(str(self.path))
        except Exception as e:  # the library raises its own Exception type for every parse error
            raise SlowllamaError(f"{self.path}: not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._resolve_specials(special or SpecialTokens(), None, None)

    def _token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def _id_token(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _adds(self) -> tuple[bool, bool]:
        # what the file's post-processor puts around a text (Llama 3's adds <|begin_of_text|>, SmolLM2's nothing)
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        return (len(full) > len(plain) and full[0] == self.bos_id,
                len(full) > len(plain) and full[-1] == self.eos_id)


def load_tokenizer(folder: Path):
    """The tokenizer of a model or store folder: tokenizer.model (sentencepiece) if present, else tokenizer.json."""
    folder = Path(folder)
    special = read_special_tokens(folder)
    if (folder / "tokenizer.model").is_file():
        return Tokenizer(folder / "tokenizer.model", special)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(folder / "tokenizer.json", special)
    raise SlowllamaError(f"{folder}: no tokenizer.model or tokenizer.json")


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in a folder, in TOKENIZER_FILES order."""
    return [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


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
