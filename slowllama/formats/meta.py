"""Meta's checkpoints <-> store: streaming prepare (shard by shard) and export (one output shard at a
time), and params.json <-> ModelArgs. Hugging Face folders: formats/hf.py; which is which: formats/convert.py.

Meta's consolidated.NN.pth shards each hold a slice of every large tensor (model parallelism):
column-parallel weights are cut along dim 0, row-parallel ones along dim 1, norms are replicated.
prepare infers each key's cut from the shapes, places every slice into its spot of the module file,
and records the source's shard count, keys, dtypes and cuts so that export can rebuild it exactly.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from slowllama.errors import SlowllamaError
from slowllama.formats.dtypes import resolve_store_dtype, source_dtypes
from slowllama.formats.hf_names import hf_key
from slowllama.jsonfile import read_json
from slowllama.model.args import ModelArgs, dtype_from_name, dtype_name
from slowllama.model.families import (CODE_LLAMA_MAX_SEQ_LEN, LLAMA3_SCALED_ROPE, embeddings_cut_by_vocabulary,
                                      is_code_llama)
from slowllama.model.layers import rope_scaling_of
from slowllama.model.shapes import expected_shapes, join_key, module_names, module_shapes, split_key
from slowllama.model.tokenizer import Tokenizer, load_tokenizer, tokenizer_files
from slowllama.store.atomic import staged_folder
from slowllama.store.builder import StoreBuilder
from slowllama.store.destination import check_destination
from slowllama.store.guards import check_free_space
from slowllama.store.manifest import Manifest
from slowllama.store.quantized import Quantization
from slowllama.store.safe_files import check_regular
from slowllama.store.safetensors_io import element_size
from slowllama.store.store import Store

SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


KNOWN_EXTRAS = {"rope.freqs"}  # non-weight keys Meta's checkpoints carry; kept and restored as they are


# The dim along which Meta's model-parallel layers cut each weight (None: replicated); used when the
# source had one shard (nothing to infer from) and export is asked for more.
META_SPLIT_DIM = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None, "rope.freqs": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None,
}


def meta_split_dim(key: str, args: ModelArgs) -> Optional[int]:
    module, local = split_key(key)
    if key == "tok_embeddings.weight" and embeddings_cut_by_vocabulary(args):
        return 0  # Llama 3 cuts its embeddings by vocabulary (VocabParallelEmbedding)
    return META_SPLIT_DIM.get(local if module.startswith("layers.") else key)


def shard_files(src: Path) -> list[Path]:
    files = sorted((p for p in src.iterdir() if SHARD_RE.match(p.name)), key=lambda p: int(SHARD_RE.match(p.name)[1]))
    if not files:
        raise SlowllamaError(f"{src}: no consolidated.*.pth shards (expected a Meta Llama folder)")
    for i, p in enumerate(files):
        if int(SHARD_RE.match(p.name)[1]) != i:
            raise SlowllamaError(f"{src}: shards are not numbered 00..{len(files) - 1:02d} ({p.name} is out of sequence)")
    return files


# torch.save's legacy (pre-1.6, non-zip) format starts with its magic number, pickled (protocol 2)
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint shard, memory-mapped; only plain tensors are accepted (weights_only)."""
    check_regular(path)  # a FIFO would block the read
    try:
        if zipfile.is_zipfile(path):
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        else:
            with open(path, "rb") as f:
                legacy = f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
            if not legacy:
                raise SlowllamaError(f"{path}: not a PyTorch checkpoint, or truncated (neither torch.save's zip "
                                     "format nor its legacy one)")
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy: read whole, no mmap
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise SlowllamaError(f"{path}: not a plain tensor checkpoint (it needs arbitrary code to unpickle, "
                                 "which weights_only refuses)") from None
        raise SlowllamaError(f"{path}: not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]  # EOFError() of an empty file says nothing
        raise SlowllamaError(f"{path}: not a PyTorch checkpoint or truncated ({reason})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise SlowllamaError(f"{path}: not a state dict of named tensors")
    return sd


def read_meta_params(src: Path) -> tuple[dict, ModelArgs]:
    if not (src / "params.json").is_file():
        raise SlowllamaError(f"{src}: no params.json (expected a Meta Llama folder: params.json, "
                             "tokenizer.model, consolidated.NN.pth)")
    params = read_json(src / "params.json")
    return params, args_from_params(params, str(src / "params.json"))


def args_from_params(params: dict, where: str = "params.json") -> ModelArgs:
    """ModelArgs of Meta's params.json dict; unknown fields are an error naming them."""
    if not isinstance(params, dict):
        raise SlowllamaError(f"{where}: expected a JSON object")
    unknown = sorted(set(params) - set(ModelArgs.META_FIELDS))
    if unknown:
        raise SlowllamaError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(ModelArgs.META_FIELDS)})")
    args = ModelArgs(**params).validate(where)  # numbers finite and in range before any arithmetic on them
    if "max_seq_len" not in params and is_code_llama(args):
        args.max_seq_len = CODE_LLAMA_MAX_SEQ_LEN  # Code Llama's params.json does not say it
    return args.validate(where)


def infer_split(key: str, piece: tuple, full: tuple, n: int, where: str) -> Optional[int]:
    """Which dim of `full` the shard's `piece` is a 1/n cut of (None: replicated)."""
    if piece == full:
        return None
    for d in range(len(full)):
        if (len(piece) == len(full) and piece[d] * n == full[d]
                and all(piece[i] == full[i] for i in range(len(full)) if i != d)):
            return d
    raise SlowllamaError(f"{where}: {key!r} has shape {list(piece)}, which is not a 1/{n} slice of the "
                         f"model's {list(full)} (shards don't fit together)")


def resolve_vocab(args: ModelArgs, tok: Tokenizer, first_shard: dict, n: int, src: Path) -> None:
    """Fill in vocab_size (-1 in params.json) and check it against the tokenizer and the embedding."""
    emb = first_shard.get("tok_embeddings.weight")
    if emb is None:
        raise SlowllamaError(f"{src}/consolidated.00.pth: missing key 'tok_embeddings.weight'")
    rows = emb.shape[0]
    candidates = [rows] if emb.shape[1] * n == args.dim else [rows * n]
    vocab = args.vocab_size if args.vocab_size > 0 else candidates[0]
    if vocab not in candidates:
        raise SlowllamaError(f"{src}/params.json: vocab_size {args.vocab_size} doesn't match the embedding "
                             f"({candidates[0]} rows)")
    if tok.vocab_size > vocab:
        raise SlowllamaError(f"{tok.path}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                             f"is {vocab}")
    args.vocab_size = vocab


META_FILES = "params.json, tokenizer.model, consolidated.NN.pth"


def prepare_meta(src: Path, dest: Path, dtype: Optional[str] = None, force: bool = False,
                 log: Callable[[str], None] = print, quantization: Optional[Quantization] = None) -> Path:
    """Stream a Meta folder into a new store (its blocks' linear weights quantized with `quantization`). Peak
    memory: about one shard (mapped) plus one tensor."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise SlowllamaError(f"{src}: no such folder")
    params, args = read_meta_params(src)
    shards = shard_files(src)
    tok = load_tokenizer(src)
    check_destination(dest, "store", force, (src,))

    n = len(shards)
    first = load_shard(shards[0])
    resolve_vocab(args, tok, first, n, src)
    full = expected_shapes(args)
    store_dtype = resolve_store_dtype(dtype, first["tok_embeddings.weight"].dtype, str(shards[0]))

    # layout of every key from the first shard; each later shard must agree
    layout, extras = {}, {}
    for key, t in first.items():
        if key in full:
            layout[key] = infer_split(key, tuple(t.shape), full[key], n, str(shards[0]))
        elif key in KNOWN_EXTRAS:
            extras[key] = (t.dtype, tuple(t.shape))
        else:
            raise SlowllamaError(f"{shards[0]}: unexpected key {key!r}")
    for key in full:
        if key not in first:
            raise SlowllamaError(f"{shards[0]}: missing key {key!r}")
    if n == 1:  # nothing to infer from: record Meta's usual cuts so export can write more shards
        layout = {key: meta_split_dim(key, args) for key in layout}

    store_bytes = sum(element_size(store_dtype) * _numel(s) for s in full.values())
    store_bytes += sum(element_size(d) * _numel(s) for d, s in extras.values())
    check_free_space(dest.parent, store_bytes + (64 << 20), f"{dest}")

    builder = StoreBuilder(dest, force=force, quantization=quantization)
    try:
        writers = {}
        for name in module_names(args):
            specs = {local: (store_dtype, shape) for local, shape in module_shapes(args, name).items()}
            writers[name] = builder.module_writer(name, specs)
        if extras:
            writers[""] = builder.module_writer("extras", extras)
        shard_records = []
        total = sum(p.stat().st_size for p in shards)
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None) as bar:
            for i, path in enumerate(shards):
                sd = first if i == 0 else load_shard(path)
                first = None  # drop the mapping of shard 0 once we move on
                shard_records.append({"file": path.name, "keys": [[k, dtype_name(t.dtype), list(t.shape)]
                                                                  for k, t in sd.items()]})
                _place_shard(sd, i, n, path, full, layout, extras, writers)
                bar.set_postfix_str(path.name)
                bar.update(path.stat().st_size)
                del sd
        for name, writer in tqdm(writers.items(), desc="checksum", disable=None, leave=False):
            builder.finish_module(name or "extras", writer)
        tok_files = tokenizer_files(src)
        for name in tok_files:
            builder.copy_file(src / name, name)
        return builder.finish(Manifest.new(args, store_dtype, {
            "format": "meta", "params": params, "shards": shard_records, "split_dims": layout,
            "tokenizer_files": tok_files}))
    except BaseException:
        builder.abort()
        raise


def store_from_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, dest: Path, tokenizer: Optional[Path],
                          dtype: torch.dtype = torch.float32, source: Optional[dict] = None,
                          force: bool = False) -> Path:
    """A store made directly from an in-memory state dict with Meta's keys (tests, synthetic benchmarks)."""
    full = expected_shapes(args)
    missing = sorted(set(full) - set(sd))
    if missing:
        raise SlowllamaError(f"state dict: missing key {missing[0]!r}")
    builder = StoreBuilder(Path(dest), force=force)
    try:
        for name in module_names(args):
            builder.write_module(name, {local: sd[join_key(name, local)].to(dtype).contiguous()
                                        for local in module_shapes(args, name)})
        files = []
        if tokenizer is not None:
            builder.copy_file(Path(tokenizer), Path(tokenizer).name)
            files = [Path(tokenizer).name]
        return builder.finish(Manifest.new(args, dtype, source or {
            "format": "meta", "params": meta_params(args), "tokenizer_files": files}))
    except BaseException:
        builder.abort()
        raise


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _place_shard(sd, i, n, path, full, layout, extras, writers) -> None:
    """Write shard i's slice of every tensor into its module file."""
    seen = set(sd)
    for key in full:
        if key not in seen:
            raise SlowllamaError(f"{path}: missing key {key!r}")
    for key, t in sd.items():
        if key in extras:
            if tuple(t.shape) != extras[key][1]:
                raise SlowllamaError(f"{path}: {key!r} has shape {list(t.shape)}, shard 0 has {list(extras[key][1])}")
            if i == 0:
                writers[""].write(key, t)
            continue
        if key not in full:
            raise SlowllamaError(f"{path}: unexpected key {key!r}")
        dim = infer_split(key, tuple(t.shape), full[key], n, str(path))
        if n > 1 and dim != layout[key]:
            raise SlowllamaError(f"{path}: {key!r} is cut differently from shard 0 (shards don't fit together)")
        module, local = split_key(key)
        if dim is None:
            if i == 0:
                writers[module].write(local, t)
        else:
            writers[module].write(local, t, dim=dim, start=i * t.shape[dim])


def export_meta(store_path: Path, out: Path, shards: Optional[int] = None, dtype: Optional[str] = None,
                force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write a Meta folder from a store: the source's shard count, keys and dtypes unless told otherwise."""
    store = Store.open(store_path)
    out = Path(out)
    check_destination(out, "checkpoint", force, (store.path,))
    out_dtype = dtype_from_name(dtype, "--dtype") if dtype else None
    source, n, plan, full, params, tokenizer_files = export_plan(store, shards, out_dtype)

    total = sum(element_size(dt) * _numel(full.get(k) or ()) for k, _, _, _, dt in plan)
    check_free_space(out.parent, total + (16 << 20), str(out))
    problems = store.verify_all()
    if problems:
        raise SlowllamaError(problems[0])

    with staged_folder(out) as tmp:
        with tqdm(total=n, desc="export", unit="shard", disable=None) as bar:
            for i in range(n):
                tensors = {}
                for key, module, local, dim, dt in plan:
                    if dim is None:
                        t = store.read_slice(module, local)
                    else:
                        size = full[key][dim] // n
                        t = store.read_slice(module, local, dim, i * size, size)
                    tensors[key] = t.to(dt).contiguous().clone()  # own storage: torch.save writes whole storages
                path = tmp / f"consolidated.{i:02d}.pth"
                torch.save(tensors, path)
                del tensors
                bar.update(1)
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for name in tokenizer_files:
            shutil.copyfile(store.path / name, tmp / name)
    return out


def export_plan(store: Store, shards: Optional[int] = None, out_dtype=None):
    """What a Meta export writes: (source record, shard count, plan, full shapes, params.json, tokenizer files).

    The plan holds (key, module, local key, split dim, dtype) of every tensor, in the source's key order
    (a store prepared from Hugging Face: Meta's order, its dtypes). A malformed source record (a
    hand-edited manifest) is an error naming the field; so is what params.json cannot express.
    """
    source = store.source
    if not source.is_object:
        raise SlowllamaError(f"{store.path / 'manifest.json'}: field 'source' must be an object")
    recorded = source.layout
    from_meta = source.format == "meta"
    src_shards = recorded.get("shards") if from_meta else None
    n = shards if shards is not None else (len(src_shards) if isinstance(src_shards, list) and src_shards else 1)
    if n < 1:
        raise SlowllamaError(f"--shards: must be at least 1, got {n}")
    full = expected_shapes(store.args)
    try:
        plan = _plan(store, recorded, src_shards, n, out_dtype, full)
        params = recorded.get("params") if from_meta else None
        if params is not None and not isinstance(params, dict):
            raise TypeError("'params' is not an object")
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        raise SlowllamaError(f"{store.path / 'manifest.json'}: field 'source' is malformed ({type(e).__name__}: "
                             f"{str(e)[:80]})") from None
    if params:  # written out as params.json: its numbers checked like any params.json's
        args_from_params(params, f"{store.path / 'manifest.json'}: source.params")
    params = params or meta_params(store.args)  # refuses what params.json cannot express, before anything is written
    tokenizer_files = ["tokenizer.model"] if source.tokenizer_files is None else source.tokenizer_files
    for name in tokenizer_files if isinstance(tokenizer_files, list) else [tokenizer_files]:
        if not isinstance(name, str) or Path(name).name != name or not (store.path / name).is_file() \
                or (store.path / name).is_symlink():
            raise SlowllamaError(f"{store.path}: tokenizer file {name!r} is not a file of the store")
    return source, n, plan, full, params, tokenizer_files


def _plan(store: Store, recorded: dict, src_shards, n: int, out_dtype, full: dict) -> list[tuple]:
    """recorded: the source record's own fields (shards, split_dims), unchecked."""
    args = store.args
    if src_shards:  # key order and dtypes of the source's shard 0 (all shards hold the same keys)
        keys = [(k, dtype_from_name(d) if d in ("fp32", "bf16", "fp16") else store.dtype)
                for k, d, _ in src_shards[0]["keys"]]
    else:
        dtypes = source_dtypes(store)  # by HF name, for a store prepared from Hugging Face
        keys = [(k, dtypes.get(hf_key(k), store.dtype)) for k in full]
        if args.tie_word_embeddings:  # Meta's checkpoints always carry the output matrix
            keys.append(("output.weight", dtypes.get("model.embed_tokens.weight", store.dtype)))
    if args.tie_word_embeddings:
        full["output.weight"] = full["tok_embeddings.weight"]
    split_dims = recorded.get("split_dims") or {k: meta_split_dim(k, args) for k, _ in keys}
    extras = set(store.read("extras")) if store.has("extras") else set()
    plan = []
    for key, src_dtype in keys:
        module, local = split_key(key)
        if key == "output.weight" and args.tie_word_embeddings:
            module, local = "tok_embeddings", "weight"
        if key not in full and not (module == "" and key in extras):
            raise KeyError(f"{key!r} is not in the store")
        dim = split_dims.get(key) if key in full else None
        if dim is not None and full[key][dim] % n:
            raise SlowllamaError(f"--shards {n}: {key!r} of size {full[key][dim]} along dim {dim} "
                                 f"does not split into {n} equal parts")
        plan.append((key, module or "extras", local, dim, out_dtype or src_dtype))
    return plan


# (multiple_of, ffn_dim_multiplier) of Meta's releases, tried first so that their params.json come back
FFN_CANDIDATES = [(256, None), (256, 1.0), (256, 1.3), (1024, 1.3), (4096, 1.3), (256, 1.5), (1024, 1.5),
                  (1024, 1.0), (4096, 1.0)]


def meta_params(args: ModelArgs) -> dict:
    """params.json for a model: Meta's fields only. A feed-forward width given explicitly (HF's
    intermediate_size) becomes multiple_of / ffn_dim_multiplier that reproduce it; a rope scaling other
    than Llama 3.1's defaults (use_scaled_rope) and anything else params.json cannot say is refused."""
    d = args.to_dict()
    out = {k: d[k] for k in ModelArgs.META_FIELDS if d.get(k) is not None}
    if args.kv_heads == args.n_heads:
        out.pop("n_kv_heads", None)
    if args.hidden_dim_override:
        out.pop("ffn_dim_multiplier", None)
        out.update(_ffn_fields(args))
    scaling = rope_scaling_of(args)
    if scaling:
        numbers = {k: scaling.get(k) for k in LLAMA3_SCALED_ROPE}
        if numbers != LLAMA3_SCALED_ROPE:
            raise SlowllamaError(f"--format meta: Meta's params.json cannot express this llama3 rope scaling "
                                 f"({numbers}; use_scaled_rope means {LLAMA3_SCALED_ROPE}); export --format hf")
        out["use_scaled_rope"] = True
    if not out.get("use_scaled_rope"):
        out.pop("use_scaled_rope", None)
    return out


def _ffn_fields(args: ModelArgs) -> dict:
    """multiple_of and ffn_dim_multiplier for which Meta's formula gives args.hidden_dim_override."""
    want = args.hidden_dim_override
    base = int(2 * (4 * args.dim) / 3)
    exact = (want + 0.5) / base  # int(exact * base) == want, whatever the rounding of the product
    for multiple_of, mult in FFN_CANDIDATES + [(1, exact)]:
        fields = {"multiple_of": multiple_of, **({"ffn_dim_multiplier": mult} if mult is not None else {})}
        trial = ModelArgs(dim=args.dim, n_heads=args.n_heads, **fields)
        if trial.hidden_dim == want:
            return fields
    raise SlowllamaError(f"--format meta: no multiple_of / ffn_dim_multiplier gives the feed-forward width {want}")
