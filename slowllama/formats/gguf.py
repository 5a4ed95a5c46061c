"""A store as one GGUF file (llama.cpp, Ollama, LM Studio), written with llama.cpp's own `gguf` package.

GGUF's "llama" architecture holds Llama 2, Code Llama, Llama 3 and Mistral alike. Its tensors have
llama.cpp's names and Meta's layout: wq / wk rows in consecutive rotary pairs, which is what the
store keeps (llama.cpp's converter permutes Hugging Face's rotate_half rows back to it; here there
is nothing to undo). Norms and rope factors are f32 as llama.cpp writes them; the matrices in
--dtype. The tokenizer goes in as llama.cpp reads it: a sentencepiece model's pieces, scores and
types ("llama"), or a tokenizer.json's byte-level BPE vocabulary and merges ("gpt2").

Written in a streamed way: every tensor's header first, then the data module by module (peak
memory: one module), into a temporary file renamed into place at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from slowllama.errors import SlowllamaError
from slowllama.formats.spm_json import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, read_spm
from slowllama.model.args import ModelArgs
from slowllama.model.layers import _llama3_scaled_inv_freq, rope_scaling_of
from slowllama.model.shapes import module_names, module_shapes
from slowllama.model.tokenizer import HFTokenizer, load_tokenizer
from slowllama.store.destination import check_output_file, overlaps, real
from slowllama.store.guards import check_free_space
from slowllama.store.store import Store

GGUF_DTYPES = {"fp32": "F32", "f32": "F32", "fp16": "F16", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
STORE_DEFAULT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

# Meta's names inside a block -> llama.cpp's
BLOCK_NAMES = {
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
HEAD_NAMES = {"norm.weight": "output_norm.weight", "output.weight": "output.weight"}

# Llama 3's pre-tokenizer split (its tokenizer.json's Split regex): llama.cpp's "llama-bpe"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_path(out: Path) -> Path:
    """OUT itself if it names a .gguf file, else OUT/model.gguf."""
    out = Path(out)
    return out if out.suffix.lower() == ".gguf" else out / "model.gguf"


def _tensor_plan(args: ModelArgs) -> list[tuple[str, str, str]]:
    """(module, key inside it, GGUF name) of every tensor, in the order written."""
    plan = [("tok_embeddings", "weight", "token_embd.weight")]
    for i in range(args.n_layers):
        plan += [(f"layers.{i}", key, f"blk.{i}.{BLOCK_NAMES[key]}") for key in module_shapes(args, f"layers.{i}")]
    plan += [("head", key, HEAD_NAMES[key]) for key in module_shapes(args, "head")]
    return plan


def rope_factors(args: ModelArgs) -> Optional[np.ndarray]:
    """llama.cpp's rope_freqs.weight for the "llama3" scaling: each frequency's divisor (None without scaling)."""
    scaling = rope_scaling_of(args)
    if scaling is None:
        return None
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    return (inv_freq / _llama3_scaled_inv_freq(inv_freq, scaling)).to(torch.float32).numpy()


def _check_shapes(store: Store, qtype_name: str, n_tokens: int, names: dict[str, tuple[int, ...]]) -> None:
    """What llama.cpp's llama architecture cannot hold, named before anything is written."""
    args = store.args
    if args.head_dim % 2:
        raise SlowllamaError(f"--format gguf: head dimension {args.head_dim} (dim {args.dim} / {args.n_heads} heads) "
                             "is odd; llama.cpp's rotary embedding needs an even one")
    if n_tokens > args.vocab_size:
        raise SlowllamaError(f"--format gguf: the tokenizer has {n_tokens} tokens but token_embd.weight only "
                             f"{args.vocab_size} rows; llama.cpp needs a row for every token")
    if qtype_name == "Q8_0":
        for name, shape in names.items():
            if len(shape) == 2 and shape[-1] % 32:
                raise SlowllamaError(f"--dtype q8_0: {name} has rows of {shape[-1]} values, not a multiple of 32 "
                                     "(q8_0's block); use --dtype f16, bf16 or f32")


def _spm_vocab(tok) -> dict:
    model = read_spm(tok.path)
    unk = next((i for i, t in enumerate(model.types) if t == UNKNOWN), None)
    return {"model": "llama", "tokens": list(model.pieces), "scores": list(model.scores),
            "types": list(model.types), "merges": None, "pre": None, "unk": unk,
            "space_prefix": model.add_dummy_prefix}


def _bpe_vocab(tok: HFTokenizer, log) -> dict:
    """A tokenizer.json's byte-level BPE as llama.cpp's "gpt2" vocabulary."""
    raw = json.loads(tok.path.read_text(encoding="utf-8"))
    model = raw.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise SlowllamaError(f"{tok.path}: a {model.get('type')!r} tokenizer; GGUF export takes byte-level BPE "
                             "tokenizer.json files (Llama 3) and sentencepiece tokenizer.model files")
    size = tok.vocab_size
    tokens: list[Optional[str]] = [None] * size
    types = [NORMAL] * size
    for piece, i in model["vocab"].items():
        if 0 <= i < size:
            tokens[i] = piece
    for added in raw.get("added_tokens") or []:
        i = added.get("id")
        if isinstance(i, int) and 0 <= i < size:
            tokens[i] = added.get("content")
            types[i] = CONTROL if added.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # a hole in the ids: a placeholder, as llama.cpp's converter writes
            tokens[i], types[i] = f"[PAD{i}]", USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre_json = json.dumps(raw.get("pre_tokenizer"))
    if LLAMA3_SPLIT.replace("\\", "\\\\") in pre_json or LLAMA3_SPLIT in pre_json:
        pre = "llama-bpe"
    elif '"ByteLevel"' in pre_json and '"use_regex": false' not in pre_json:
        pre = "gpt-2"  # ByteLevel with its own split, GPT-2's regex (llama.cpp spells it "gpt-2")
    else:
        pre = "default"
        log(f"{tok.path.name}: pre-tokenizer not one llama.cpp names (Llama 3's, GPT-2's): "
            "tokenizer.ggml.pre = default")
    return {"model": "gpt2", "tokens": tokens, "scores": None, "types": types, "merges": merges, "pre": pre,
            "unk": None, "space_prefix": None}


def _vocabulary(store: Store, log) -> tuple[object, dict]:
    tok = load_tokenizer(store.path)
    vocab = _bpe_vocab(tok, log) if isinstance(tok, HFTokenizer) else _spm_vocab(tok)
    return tok, vocab


def _pad_vocab(vocab: dict, n_rows: int) -> None:
    """Embedding rows beyond the tokenizer (a vocabulary padded for speed): placeholder tokens, as llama.cpp does."""
    for i in range(len(vocab["tokens"]), n_rows):
        vocab["tokens"].append(f"[PAD{i}]")
        vocab["types"].append(USER_DEFINED)
        if vocab["scores"] is not None:
            vocab["scores"].append(-1000.0)


def _encode(t: torch.Tensor, qtype, gguf) -> np.ndarray:
    """One tensor's data in a GGML type: a numpy array of its bytes (or of its values for f32 / f16)."""
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == q.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == q.BF16:  # the bits of torch's bfloat16 are GGML's: no detour through numpy's floats
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def export_gguf(store_path: Path, out: Path, dtype: Optional[str] = None, force: bool = False,
                log: Callable[[str], None] = print) -> Path:
    """Write a store as one GGUF file (OUT if it ends in .gguf, else OUT/model.gguf); returns its path.

    dtype: fp32 / f32, fp16 / f16, bf16 or q8_0 for the matrices (default: the store's dtype); norms
    and rope factors are always f32.
    """
    try:
        import gguf
    except ImportError:
        raise SlowllamaError("--format gguf: needs the 'gguf' package (pip install 'slowllama[gguf]')") from None
    store = Store.open(store_path)
    args = store.args
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise SlowllamaError(f"--dtype: {dtype!r} is not a GGUF type (choose from fp32, fp16, bf16, q8_0)")
    qname = GGUF_DTYPES[dtype] if dtype else STORE_DEFAULT.get(store.dtype, "F32")
    qtype = gguf.GGMLQuantizationType[qname]
    path = gguf_path(out)
    if path.exists() and not force:
        raise SlowllamaError(f"{path}: already exists (use --force to replace it)")
    if path.parent.exists() and not path.parent.is_dir():
        raise SlowllamaError(f"{path.parent}: not a folder")
    if overlaps(real(path), real(store_path)):
        raise SlowllamaError(f"{path}: lies inside the store {store_path}, which this command reads (choose "
                             "another place)")
    check_output_file(path, magic=b"GGUF")  # no link, no special file; --force replaces only a GGUF file

    plan = _tensor_plan(args)
    shapes = {name: module_shapes(args, module)[key] for module, key, name in plan}
    tok, vocab = _vocabulary(store, log)
    _check_shapes(store, qname, len(vocab["tokens"]), shapes)
    _pad_vocab(vocab, args.vocab_size)
    factors = rope_factors(args)

    def type_of(name: str):
        return qtype if len(shapes[name]) == 2 else gguf.GGMLQuantizationType.F32

    def nbytes(shape, t) -> int:
        block, size = gguf.GGML_QUANT_SIZES[t]
        return int(np.prod(shape)) // block * size

    total = sum(nbytes(s, type_of(n)) for n, s in shapes.items())
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    check_free_space(existing, total + (16 << 20), str(path))
    problems = store.verify_all()
    if problems:
        raise SlowllamaError(problems[0])
    path.parent.mkdir(parents=True, exist_ok=True)  # OUT/ for OUT/model.gguf, once every check passed

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_metadata(writer, gguf, store, tok, vocab, qname, path.stem if path.stem != "model" else path.parent.name)
        for name, shape in shapes.items():
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, type_of(name)),
                                   raw_dtype=type_of(name))
        if factors is not None:
            writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=total, desc="export", unit="B", unit_scale=True, disable=None) as bar:
            for module in module_names(args):
                tensors = store.weights(module)  # (a quantized store's dequantized)
                for m, key, name in plan:
                    if m == module:
                        data = _encode(tensors[key], type_of(name), gguf)
                        writer.write_tensor_data(data)
                        bar.update(data.nbytes)
                del tensors
            if factors is not None:
                writer.write_tensor_data(factors)
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    log(f"wrote {path} ({qname.lower()}, {len(shapes) + (factors is not None)} tensors)")
    return path


def _write_metadata(writer, gguf, store: Store, tok, vocab: dict, qname: str, name: str) -> None:
    args = store.args
    writer.add_name(name)  # the output's name (transformers' loader reads a name with "mistral" as Mistral)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qname])
    if qname == "Q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)  # grouped-query attention: fewer key/value heads
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.norm_eps))
    writer.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    if vocab["merges"] is not None:
        writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    others = sorted(tok.stop_ids - {tok.eos_id})
    if others:  # an end-of-turn id besides EOS (Llama 3 Instruct's <|eot_id|>)
        writer.add_eot_token_id(others[0])
    if vocab["unk"] is not None:
        writer.add_unk_token_id(vocab["unk"])
    pad = tok.sp.pad_id() if hasattr(tok, "sp") else None
    if pad is not None and pad >= 0:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(bool(tok.add_bos))
    writer.add_add_eos_token(bool(tok.add_eos))
    if vocab["space_prefix"] is not None:
        writer.add_add_space_prefix(bool(vocab["space_prefix"]))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
