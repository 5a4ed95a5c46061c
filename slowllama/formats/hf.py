"""Hugging Face checkpoints <-> store: streaming prepare and export of safetensors shards.

prepare reads each shard by mmap (safetensors' safe_open), one tensor at a time: renamed and, for wq/wk,
put back into Meta's rotary layout (formats/hf_names.py), then written into its module file. The manifest
records what export needs to rebuild the folder exactly: config.json, each shard's name, metadata and
tensors in file order with their dtypes, the index's metadata; config.json, generation_config.json,
the index and the tokenizer files are copied into the store as they are.
export writes each output shard tensor by tensor (peak memory: one tensor), by default with the
source's shard names, key-to-file map and dtypes, so an untrained store comes out byte-identical.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from tqdm import tqdm

from slowllama.errors import SlowllamaError
from slowllama.formats import hf_names as hf
from slowllama.formats.dtypes import resolve_store_dtype, source_dtypes
from slowllama.formats.spm_json import convertible, read_spm, spm_to_tokenizer_json
from slowllama.jsonfile import read_json
from slowllama.model.args import ModelArgs, dtype_from_name
from slowllama.model.shapes import expected_shapes, module_names, module_shapes, split_key
from slowllama.model.tokenizer import load_tokenizer, tokenizer_files
from slowllama.sizes import parse_size
from slowllama.store import safetensors_io as st
from slowllama.store.atomic import staged_folder
from slowllama.store.builder import StoreBuilder
from slowllama.store.destination import check_destination
from slowllama.store.guards import check_free_space
from slowllama.store.manifest import Manifest, SourceRecord
from slowllama.store.quantized import Quantization
from slowllama.store.safetensors_io import element_size
from slowllama.store.store import Store

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SOURCE_FILES = ("config.json", "generation_config.json", INDEX)  # copied into the store as they are
EXPECTED = ("config.json, and model.safetensors or model-NNNNN-of-NNNNN.safetensors shards with "
            "model.safetensors.index.json")
WEIGHT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}  # safetensors' names -> ours
DEFAULT_MAX_SHARD = "5G"
_TIED_COPY = "tied copy"  # route of an lm_head.weight that duplicates the tied embedding


def is_hf_folder(src: Path) -> bool:
    return (Path(src) / "config.json").is_file()


def shard_names(src: Path) -> tuple[list[str], Optional[dict]]:
    """The weight files of a Hugging Face folder, and its index (None for a single model.safetensors).

    Like transformers, a single model.safetensors wins over an index.
    """
    if (src / SINGLE).is_file():
        return [SINGLE], None
    if not (src / INDEX).is_file():
        others = sorted(p.name for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        found = f" (found {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
        raise SlowllamaError(f"{src}: no {SINGLE} or {INDEX}{found}; expected {EXPECTED}")
    index = read_json(src / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SlowllamaError(f"{src / INDEX}: field 'weight_map' must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or name.startswith("."):
            raise SlowllamaError(f"{src / INDEX}: file name {name!r} is not a plain file name")
        if not (src / name).is_file():
            raise SlowllamaError(f"{src / INDEX}: names {name}, which is missing")
    return files, index


def read_layouts(src: Path, files: list[str], index: Optional[dict]) -> list[dict]:
    """Each shard's tensors in file order ([name, dtype, shape]) and metadata, checked against the index."""
    weight_map = index["weight_map"] if index else None
    layouts = []
    for name in files:
        entries, metadata = st.read_layout(str(src / name))
        for key, dtype, shape in entries:
            if weight_map is not None and weight_map.get(key) != name:
                where = f"maps it to {weight_map[key]}" if key in weight_map else "does not name it"
                raise SlowllamaError(f"{src / name}: holds tensor {key!r}, but {INDEX} {where}")
        layouts.append({"file": name, "metadata": metadata or None,
                        "keys": [[key, dtype, shape] for key, dtype, shape in entries]})
    if weight_map is not None:
        held = {key for layout in layouts for key, _, _ in layout["keys"]}
        for key, name in weight_map.items():
            if key not in held:
                raise SlowllamaError(f"{src / INDEX}: tensor {key!r} should be in {name}, which does not hold it")
    return layouts


def plan_routes(src: Path, layouts: list[dict], args: ModelArgs) -> dict[str, Optional[str]]:
    """Where each source tensor goes: its Meta key, None for an extra (inv_freq), or _TIED_COPY."""
    full = expected_shapes(args)
    routes: dict[str, Optional[str]] = {}
    seen: dict[str, str] = {}
    for layout in layouts:
        path = src / layout["file"]
        for key, dtype, shape in layout["keys"]:
            if key in seen:
                raise SlowllamaError(f"{path}: tensor {key!r} is also in {seen[key]}")
            seen[key] = layout["file"]
            meta = hf.meta_key(key, args.n_layers)
            if meta is None and hf.is_hf_extra(key):
                if dtype not in st.TORCH_DTYPES:
                    raise SlowllamaError(f"{path}: tensor {key!r} has dtype {dtype}, which slowllama cannot keep")
                routes[key] = None
                continue
            if meta == "output.weight" and args.tie_word_embeddings:
                meta, route = "tok_embeddings.weight", _TIED_COPY
            else:
                route = meta
            if meta is None or meta not in full:
                raise SlowllamaError(f"{path}: unexpected tensor {key!r} (not a weight of a {args.n_layers}-layer "
                                     "Llama per config.json)")
            if tuple(shape) != full[meta]:
                raise SlowllamaError(f"{path}: tensor {key!r} has shape {list(shape)}, config.json implies "
                                     f"{list(full[meta])}")
            if dtype not in WEIGHT_DTYPES:
                raise SlowllamaError(f"{path}: tensor {key!r} has dtype {dtype}, expected F32, BF16 or F16")
            routes[key] = route
    present = {meta for meta in routes.values() if meta}
    for meta in full:
        if meta not in present:
            raise SlowllamaError(f"{src}: tensor {hf.hf_key(meta)!r} missing (no shard holds it)")
    return routes


def _check_tied_copy(src: Path, layouts: list[dict], routes: dict) -> None:
    """A tied model may still carry lm_head.weight: accept it only as an exact copy of the embeddings."""
    where = {key: layout["file"] for layout in layouts for key, _, _ in layout["keys"]}
    copies = [key for key, route in routes.items() if route == _TIED_COPY]
    for key in copies:
        with safe_open(str(src / where[key]), framework="pt") as f:
            head = f.get_tensor(key)
        with safe_open(str(src / where["model.embed_tokens.weight"]), framework="pt") as f:
            emb = f.get_tensor("model.embed_tokens.weight")
        if not torch.equal(head, emb):
            raise SlowllamaError(f"{src / where[key]}: {key!r} differs from the embeddings, but config.json says "
                                 "tie_word_embeddings true")


def prepare_hf(src: Path, dest: Path, dtype: Optional[str] = None, force: bool = False,
               log: Callable[[str], None] = print, quantization: Optional[Quantization] = None) -> Path:
    """Stream a Hugging Face Llama / Mistral folder into a new store (its blocks' linear weights quantized with
    `quantization`). Peak memory: about one tensor."""
    src, dest = Path(src), Path(dest)
    config = read_json(src / "config.json")
    if isinstance(config, dict) and config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method", "?") \
            if isinstance(config["quantization_config"], dict) else "?"
        raise SlowllamaError(f"{src / 'config.json'}: a quantized checkpoint (quantization_config: {method}); "
                             "prepare reads fp32, bf16 or fp16 weights (use the unquantized model; --quantize nf4 "
                             "quantizes it)")
    args, notes = hf.args_from_config(config, str(src / "config.json"))
    for note in notes:
        log(note)
    files, index = shard_names(src)
    layouts = read_layouts(src, files, index)
    routes = plan_routes(src, layouts, args)
    tok = load_tokenizer(src)
    if tok.vocab_size > args.vocab_size:
        raise SlowllamaError(f"{tok.path}: the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size "
                             f"is {args.vocab_size}")
    check_destination(dest, "store", force, (src,))
    _check_tied_copy(src, layouts, routes)

    emb_dtype = next(d for layout in layouts for k, d, _ in layout["keys"] if k == "model.embed_tokens.weight")
    store_dtype = resolve_store_dtype(dtype, WEIGHT_DTYPES[emb_dtype], str(src))
    full = expected_shapes(args)
    extras = {key: (st.TORCH_DTYPES[d], tuple(s)) for layout in layouts for key, d, s in layout["keys"]
              if routes[key] is None}
    store_bytes = sum(element_size(store_dtype) * _numel(s) for s in full.values())
    store_bytes += sum(element_size(d) * _numel(s) for d, s in extras.values())
    check_free_space(dest.parent, store_bytes + (64 << 20), f"{dest}")

    builder = StoreBuilder(dest, force=force, quantization=quantization)
    try:
        writers = {name: builder.module_writer(name, {local: (store_dtype, shape) for local, shape
                                                      in module_shapes(args, name).items()})
                   for name in module_names(args)}
        if extras:
            writers["extras"] = builder.module_writer("extras", extras)
        total = sum((src / name).stat().st_size for name in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None) as bar:
            for layout in layouts:
                path = src / layout["file"]
                bar.set_postfix_str(path.name)
                with _open_shard(path) as f:
                    for key, d, shape in layout["keys"]:
                        route = routes[key]
                        if route != _TIED_COPY:
                            t = f.get_tensor(key)  # one tensor, copied out of the mapped file
                            if route is None:
                                writers["extras"].write(key, t)
                            else:
                                module, local = split_key(route)
                                writers[module].write(local, hf.tensor_to_meta(route, t, args))
                            del t
                        bar.update(st.element_size(st.TORCH_DTYPES[d]) * _numel(shape))
        for name, writer in tqdm(writers.items(), desc="checksum", disable=None, leave=False):
            builder.finish_module(name, writer)
        copied = [name for name in SOURCE_FILES if (src / name).is_file()]
        tok_files = tokenizer_files(src)
        for name in copied + tok_files:
            builder.copy_file(src / name, name)
        return builder.finish(Manifest.new(args, store_dtype, {
            "format": "hf", "config": config, "files": copied, "tokenizer_files": tok_files,
            "index": {"metadata": index.get("metadata")} if index else None, "shards": layouts}))
    except BaseException:
        builder.abort()
        raise


class _open_shard:
    """safe_open with its errors (a corrupt shard) as one line naming the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise SlowllamaError(f"{path}: cannot read it as safetensors ({str(e).splitlines()[0][:120]})") from None

    def __enter__(self):
        return self.f.__enter__()

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# ---- export ---------------------------------------------------------------------------------------

@dataclass
class OutShard:
    file: str
    metadata: Optional[dict]
    tensors: list  # [(hf key, torch dtype, shape)] in file order


def _safetensors_order(tensors: list) -> list:
    """Within a file, the safetensors library orders tensors by dtype (widest first), then by name."""
    rank = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
    return sorted(tensors, key=lambda t: (rank.get(t[1], 9), t[0]))


def plan_export(store: Store, shards: Optional[int], max_shard_size: Optional[str],
                out_dtype: Optional[torch.dtype]) -> tuple[list[OutShard], bool]:
    """The output files and their tensors; True if this is the source's own layout."""
    args, source = store.args, store.source
    if source.format == "hf" and shards is None and max_shard_size is None:
        plan = [OutShard(layout["file"], layout["metadata"],
                         [(k, out_dtype or st.TORCH_DTYPES.get(d, store.dtype), tuple(s)) for k, d, s in layout["keys"]])
                for layout in source.layout["shards"]]
        return plan, True
    if source.format == "hf":  # resharding: the source's tensors, in their order
        tensors = [(k, out_dtype or st.TORCH_DTYPES.get(d, store.dtype), tuple(s))
                   for layout in source.layout["shards"] for k, d, s in layout["keys"]]
    else:
        dtypes, full = source_dtypes(store), expected_shapes(args)
        tensors = [(hf.hf_key(m), out_dtype or dtypes.get(hf.hf_key(m), store.dtype), full[m])
                   for m in hf.hf_order(args)]
    sizes = [element_size(d) * _numel(s) for _, d, s in tensors]
    groups = _split(tensors, sizes, shards, parse_size(max_shard_size or DEFAULT_MAX_SHARD, "--max-shard-size"))
    n = len(groups)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [OutShard(name, {"format": "pt"}, _safetensors_order(g)) for name, g in zip(names, groups)], False


def _split(tensors: list, sizes: list[int], shards: Optional[int], max_bytes: int) -> list[list]:
    """Consecutive groups: `shards` of about equal bytes, or as few as keep each under max_bytes."""
    if shards is not None:
        if not 1 <= shards <= len(tensors):
            raise SlowllamaError(f"--shards: must be between 1 and {len(tensors)} (the number of tensors), got {shards}")
        total, groups, before = sum(sizes), [[] for _ in range(shards)], 0
        for t, size in zip(tensors, sizes):
            groups[min(shards - 1, before * shards // total)].append(t)
            before += size
        if any(not g for g in groups):
            raise SlowllamaError(f"--shards {shards}: some shard would be empty (tensors too large to spread)")
        return groups
    if max_bytes < 1:
        raise SlowllamaError(f"--max-shard-size: must be positive, got {max_bytes}")
    groups, current, used = [], [], 0
    for t, size in zip(tensors, sizes):
        if current and used + size > max_bytes:  # like transformers: a tensor larger than the limit gets its own file
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += size
    groups.append(current)
    return groups


def _producer(store: Store, args: ModelArgs):
    """produce(hf_key, dtype): the tensor as it goes into the HF file, read from the store by mmap."""
    def produce(key: str, dtype: torch.dtype) -> torch.Tensor:
        meta = hf.meta_key(key, args.n_layers)
        if meta is None:
            t = store.read_slice("extras", key)
        elif meta == "output.weight" and args.tie_word_embeddings:
            t = store.read_slice("tok_embeddings", "weight")
        else:
            module, local = split_key(meta)
            t = hf.tensor_to_hf(meta, store.read_slice(module, local), args)
        return t.to(dtype).contiguous()
    return produce


def export_hf(store_path: Path, out: Path, shards: Optional[int] = None, max_shard_size: Optional[str] = None,
              dtype: Optional[str] = None, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write a Hugging Face folder (config.json, safetensors shards + index, tokenizer files) from a store.

    Default: the source's shards, key-to-file map and dtypes (a store prepared from Meta's format gets
    transformers' layout, shards of at most 5 GiB). Peak memory: about one tensor.
    """
    store = Store.open(store_path)
    out = Path(out)
    check_destination(out, "checkpoint", force, (store.path,))
    args, source = store.args, store.source
    out_dtype = dtype_from_name(dtype, "--dtype") if dtype else None
    plan, as_source = plan_export(store, shards, max_shard_size, out_dtype)
    total = sum(element_size(d) * _numel(s) for shard in plan for _, d, s in shard.tensors)
    check_free_space(out.parent, total + (16 << 20), str(out))
    problems = store.verify_all()
    if problems:
        raise SlowllamaError(problems[0])

    with staged_folder(out) as tmp:
        produce = _producer(store, args)
        with tqdm(total=total, desc="export", unit="B", unit_scale=True, disable=None) as bar:
            for shard in plan:
                specs = {k: (d, s) for k, d, s in shard.tensors}

                def one(key, specs=specs):
                    t = produce(key, specs[key][0])
                    bar.update(t.numel() * t.element_size())
                    return t
                st.write_streamed(str(tmp / shard.file), specs, shard.metadata, one)
        _write_index(store, tmp, plan, as_source and out_dtype is None, total)
        _write_config(store, tmp, args, source, out_dtype)
        for name in ["generation_config.json"] + list(source.tokenizer_files or tokenizer_files(store.path)):
            if (store.path / name).is_file():
                shutil.copyfile(store.path / name, tmp / name)
        if (tmp / "tokenizer.model").is_file() and not (tmp / "tokenizer.json").exists():
            _write_tokenizer_json(store, tmp, args, log)
    return out


# transformers classes that rebuild a sentencepiece tokenizer with their own pipeline from tokenizer.json's
# vocabulary, rather than load the file as it is
_REBUILDING = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


def _write_tokenizer_json(store: Store, tmp: Path, args: ModelArgs, log: Callable[[str], None]) -> None:
    """tokenizer.json for a folder that has only a sentencepiece tokenizer.model: AutoTokenizer then loads
    it without protobuf and encodes as slowllama does (BOS / EOS in its post-processor as the config says)."""
    tok = load_tokenizer(store.path)
    why = convertible(read_spm(tmp / "tokenizer.model"))
    if why:
        log(f"tokenizer.model is {why}: no tokenizer.json written (transformers needs protobuf to read it)")
        return
    try:
        spm_to_tokenizer_json(tmp / "tokenizer.model", tmp / "tokenizer.json", tok.add_bos, tok.add_eos, tok.bos_id,
                              tok.eos_id)
    except SlowllamaError as e:  # no `tokenizers`: the export is still whole, with tokenizer.model alone
        log(f"{e}; exported without it")
        return
    log("wrote tokenizer.json from tokenizer.model (transformers' AutoTokenizer reads it without protobuf)")
    path = tmp / "tokenizer_config.json"
    if not path.exists():
        _write_json(path, _llama_tokenizer_config(tok, args))
        return
    config = read_json(path)
    if isinstance(config, dict) and config.get("tokenizer_class") in _REBUILDING:
        # the class would rebuild the tokenizer from the vocabulary, without the model's normalizer settings
        _write_json(path, {**config, "tokenizer_class": "PreTrainedTokenizerFast"})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # transformers' formatting


def _write_index(store: Store, tmp: Path, plan: list[OutShard], verbatim: bool, total: int) -> None:
    source = store.source
    had_index = source.format == "hf" and source.layout.get("index") is not None
    if len(plan) == 1 and not (verbatim and had_index):
        return  # one model.safetensors needs no index (transformers writes none)
    if verbatim and (store.path / INDEX).is_file():
        shutil.copyfile(store.path / INDEX, tmp / INDEX)
        return
    metadata = dict(((source.layout.get("index") or {}).get("metadata") or {}) if had_index else {})
    metadata["total_size"] = total
    weight_map = {k: shard.file for shard in plan for k, _, _ in shard.tensors}
    _write_json(tmp / INDEX, {"metadata": metadata, "weight_map": weight_map})


def _write_config(store: Store, tmp: Path, args: ModelArgs, source: SourceRecord,
                  out_dtype: Optional[torch.dtype]) -> None:
    if source.format == "hf":
        if out_dtype is None and (store.path / "config.json").is_file():
            shutil.copyfile(store.path / "config.json", tmp / "config.json")
            return
        config = dict(source.layout["config"])
        if out_dtype is not None:  # transformers 4 writes torch_dtype, 5 writes dtype
            name = str(out_dtype).replace("torch.", "")
            if "dtype" in config:
                config["dtype"] = name
            if "torch_dtype" in config or "dtype" not in config:
                config["torch_dtype"] = name
        _write_json(tmp / "config.json", config)
        return
    tok = load_tokenizer(store.path)
    dtypes = source_dtypes(store)
    main = out_dtype or dtypes.get("model.embed_tokens.weight", store.dtype)
    _write_json(tmp / "config.json", hf.config_from_args(args, str(main).replace("torch.", ""), tok.bos_id, tok.eos_id))


def _llama_tokenizer_config(tok, args: ModelArgs) -> dict:
    """tokenizer_config.json beside a tokenizer.json built from tokenizer.model; transformers loads the file as it is."""
    unk = tok.sp.IdToPiece(tok.sp.unk_id()) if tok.sp.unk_id() >= 0 else None
    return {"add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos, "bos_token": tok.bos_token,
            "eos_token": tok.eos_token, "unk_token": unk, "clean_up_tokenization_spaces": False,
            "model_max_length": args.max_seq_len, "tokenizer_class": "PreTrainedTokenizerFast"}
