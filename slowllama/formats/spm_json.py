"""A sentencepiece BPE model (tokenizer.model) as a Hugging Face tokenizer.json, built with `tokenizers`.

transformers reads a tokenizer.model only through protobuf; a tokenizer.json needs neither. The
pieces, scores and types and the normalizer's flags are read from the model file itself (the
protobuf wire format, decoded here: a few fields of three messages), so protobuf is not needed either.

The equivalence: sentencepiece's BPE repeatedly joins the adjacent pair whose union is the
highest-scoring piece; a `tokenizers` BPE joins the pair of lowest merge rank. Every split of every
piece into two pieces is a merge, ranked by the union's score: the same joins in the same order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from slowllama.errors import SlowllamaError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType


@dataclass
class SpmModel:
    """What a tokenizer.model holds that a tokenizer.json (or a GGUF file) needs."""
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    normalizer: str = "nmt_nfkc"
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False


def _fields(data: bytes, path: Path):
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    i, n = 0, len(data)

    def varint():
        nonlocal i
        out = shift = 0
        while True:
            if i >= n or shift > 63:
                raise SlowllamaError(f"{path}: not a sentencepiece model (truncated protobuf)")
            b = data[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out

    while i < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise SlowllamaError(f"{path}: not a sentencepiece model (truncated protobuf)")
            yield number, data[i:i + size]
            i += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, data[i:i + size]
            i += size
        else:
            raise SlowllamaError(f"{path}: not a sentencepiece model (protobuf wire type {wire})")


def read_spm(path: Path) -> SpmModel:
    """The pieces and settings of a sentencepiece tokenizer.model."""
    path = Path(path)
    out = SpmModel()
    for number, value in _fields(path.read_bytes(), path):
        if number == 1:  # SentencePiece: piece, score, type
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value, path):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            out.pieces.append(piece)
            out.scores.append(score)
            out.types.append(kind)
        elif number == 2:  # TrainerSpec
            for n, v in _fields(value, path):
                if n == 3:
                    out.model_type = v
                elif n == 35:
                    out.byte_fallback = bool(v)
                elif n == 24:
                    out.treat_whitespace_as_suffix = bool(v)
        elif number == 3:  # NormalizerSpec
            for n, v in _fields(value, path):
                if n == 1:
                    out.normalizer = v.decode("utf-8")
                elif n == 2:
                    out.charsmap = bytes(v)
                elif n == 3:
                    out.add_dummy_prefix = bool(v)
                elif n == 4:
                    out.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    out.escape_whitespaces = bool(v)
    if not out.pieces:
        raise SlowllamaError(f"{path}: not a sentencepiece model (no pieces)")
    return out


def bpe_merges(model: SpmModel) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, highest-scoring union first."""
    ids = {p: i for i, p in enumerate(model.pieces) if model.types[i] == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-model.scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def convertible(model: SpmModel) -> str:
    """Why the model cannot become a tokenizer.json ('' if it can)."""
    if model.model_type != BPE:
        return "not a BPE sentencepiece model"
    if model.treat_whitespace_as_suffix or not model.escape_whitespaces:
        return "a sentencepiece model with unusual whitespace settings"
    return ""


def spm_to_tokenizer_json(spm_path: Path, out: Path, add_bos: bool, add_eos: bool, bos_id: int, eos_id: int) -> None:
    """Write tokenizer.json for a sentencepiece BPE model; BOS / EOS in its post-processor as add_bos / add_eos."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    except ImportError:
        raise SlowllamaError(f"{out}: writing a tokenizer.json needs the 'tokenizers' package "
                             "(pip install 'slowllama[hf]')") from None

    model = read_spm(spm_path)
    why = convertible(model)
    if why:
        raise SlowllamaError(f"{spm_path}: {why}; no tokenizer.json can be written for it")
    vocab = {p: i for i, p in enumerate(model.pieces)}
    unk = next((p for p, t in zip(model.pieces, model.types) if t == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(model), unk_token=unk, fuse_unk=True,
                               byte_fallback=model.byte_fallback))
    # normalizers only (the whole text one word, as sentencepiece sees it): the dummy prefix goes
    # after the spaces are stripped, before the text's first character
    steps = []
    if model.normalizer != "identity" and model.charsmap:
        steps.append(normalizers.Precompiled(model.charsmap))
    if model.remove_extra_whitespaces:  # sentencepiece strips and collapses spaces (U+0020 only)
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("\\A | \\z"), "")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, t in zip(model.pieces, model.types)
                            if t in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, t in zip(model.pieces, model.types)
                    if t == USER_DEFINED])
    bos, eos = model.pieces[bos_id], model.pieces[eos_id]
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=sorted({(bos, bos_id), (eos, eos_id)}))
    tok.save(str(out))
