"""`slowllama prepare`, `export` and `fuse`: checkpoints into stores and back (formats/convert.py
dispatches by format), and fuse, the base model with LoRA adapters merged in (W + (alpha / rank) · B A),
written in the source's format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from slowllama.errors import SlowllamaError
from slowllama.formats.convert import export, prepare
from slowllama.model.lora import block_params, merged_module
from slowllama.model.shapes import module_names
from slowllama.settings import ExportSettings, FuseSettings, PrepareSettings
from slowllama.store.adapters import AdapterFolder
from slowllama.store.builder import StoreBuilder
from slowllama.store.destination import check_destination
from slowllama.store.guards import check_free_space
from slowllama.store.quantized import parse_scheme, weight_bytes
from slowllama.store.store import Store


def fuse(store_path: Path, out: Path, adapter_path: Path, shards: Optional[int] = None, dtype: Optional[str] = None,
         force: bool = False, log=print, format: Optional[str] = None) -> Path:
    """Write the base model with the adapters merged in (W + scale · B A), in the source's format (or `format`).

    The merged modules go to a temporary store beside OUT (unchanged modules are hard-linked), which
    is exported like any store and then removed.
    """
    store = Store.open(store_path)
    out = check_destination(Path(out), "checkpoint", force, (store.path, adapter_path))
    folder = AdapterFolder(Path(adapter_path))
    if not folder.exists():
        raise SlowllamaError(f"{folder.path}: no adapter_config.json (not a slowllama or PEFT adapter folder)")
    cfg = folder.load_config(store.args)
    params = folder.load_params(store.args, cfg, "cpu")
    blocks = [n for n in module_names(store.args) if n.startswith("layers.")]
    # the merged blocks, in the store's dtype (a quantized store's are unpacked)
    check_free_space(out.parent, sum(weight_bytes(store.args, n, None, store.dtype, None) for n in blocks), str(out))
    tmp = out.with_name(f".{out.name}.fused-{os.getpid()}")
    builder = StoreBuilder(tmp, force=True)
    try:
        for name in store.manifest.files["modules"]:
            if name in blocks:
                builder.write_module(name, merged_module(store.weights(name), block_params(params, name), cfg,
                                                         store.dtype))
            else:
                builder.link_module(name, store)
        source = store.source
        for f in list(source.files or []) + list(source.tokenizer_files or ["tokenizer.model"]):
            if (store.path / f).exists():  # config.json, tokenizer files...: what export copies from a store
                builder.copy_file(store.path / f, f)
        fused = builder.finish(store.manifest)  # model, dtype, source and the rest, with the fused files
        return export(fused, out, format=format, shards=shards, dtype=dtype, force=force, log=log)
    finally:
        builder.abort()
        shutil.rmtree(tmp, ignore_errors=True)


def run_prepare(s: PrepareSettings, log: Callable[[str], None]) -> None:
    quantization = parse_scheme(s.quantize, s.double_quant)
    out = prepare(Path(s.src), Path(s.store), dtype=s.dtype, force=s.force, log=log, quantization=quantization)
    log(f"prepared store {out}")


def run_export(s: ExportSettings, log: Callable[[str], None]) -> None:
    out = export(Path(s.store), Path(s.out), format=s.format, shards=s.shards, max_shard_size=s.max_shard_size,
                 dtype=s.dtype, force=s.force, log=log)
    log(f"exported {s.store} to {out}")


def run_fuse(s: FuseSettings, log: Callable[[str], None]) -> None:
    if not s.adapter_path:
        raise SlowllamaError("--adapter-path: required (the LoRA adapter folder to merge in)")
    out = fuse(Path(s.store), Path(s.out), Path(s.adapter_path), shards=s.shards, dtype=s.dtype, force=s.force,
               log=log, format=s.format)
    log(f"wrote {s.store} with the adapters of {s.adapter_path} merged in to {out}")
