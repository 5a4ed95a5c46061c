"""Streamed text keeps its spacing: what generate prints is decode(prompt + new) minus decode(prompt),
checked against each tokenizer library's own full decode (sentencepiece, tokenizers)."""

import pytest
import torch

from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.engine.generation import generate
from slowllama.formats.convert import prepare
from slowllama.model.tokenizer import load_tokenizer
from slowllama.store.store import Store

PROMPT = "Alice was"
TEXT = "Alice was beginning to get very tired, née «tired» 日本 — of sitting by her sister."


def library_decode(folder):
    """decode(ids) by the tokenizer's own library, reading the folder's file itself."""
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return lambda ids: sp.decode(list(ids))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


@pytest.mark.parametrize("kind", ["spm", "json"])
def test_stream_pieces_are_the_full_decode_minus_the_prompts(kind, hf_tokenizers):
    folder = hf_tokenizers[kind]
    tok, decode = load_tokenizer(folder), library_decode(folder)
    prompt = tok.encode(PROMPT, bos=True)
    new = tok.encode(TEXT)[len(tok.encode(PROMPT)):]  # " beginning to ...": the first starts a word
    stream = tok.stream(prompt)
    pieces = [stream.push(i) for i in new]
    pieces.append(stream.flush())
    expected = decode(prompt + new)[len(decode(prompt)):]
    assert "".join(pieces) == stream.shown == expected == TEXT[len(PROMPT):]
    assert expected.startswith(" beginning")
    assert not decode(new).startswith(" ") or kind == "json"  # sentencepiece alone drops the space
    assert all("\ufffd" not in p for p in pieces)  # byte-fallback pieces of one character shown together


def _generate_with_stream(store, tok, prompt, n):
    streams, made = [], tok.stream
    tok.stream = lambda ids: streams.append(made(ids)) or streams[-1]
    shown = []
    engine = OffloadedModel(Store.open(store), EngineConfig(torch.device("cpu"), torch.float32))
    text = generate(engine, tok, prompt, max_new_tokens=n, temperature=1.0, seed=3, on_text=shown.append)
    return text, "".join(shown), streams[0]


@pytest.mark.parametrize("kind", ["spm", "json"])
def test_generate_prints_the_full_decode_minus_the_prompts(kind, store_fp32, hf_model, tmp_path):
    if kind == "spm":
        store = store_fp32
    else:
        folder, _ = hf_model("llama3")
        store = prepare(folder, tmp_path / "llama3-store", log=lambda m: None)
    tok, decode = load_tokenizer(store), library_decode(Store.open(store).path)
    text, shown, stream = _generate_with_stream(store, tok, PROMPT, 24)
    assert len(stream.new_ids) == 24
    assert text == shown == decode(stream.prompt_ids + stream.new_ids)[len(decode(stream.prompt_ids)):]
