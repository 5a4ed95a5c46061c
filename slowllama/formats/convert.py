"""The one dispatcher of checkpoint formats: which format a folder is in, prepare and export by format."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from slowllama.errors import SlowllamaError
from slowllama.formats.gguf import export_gguf
from slowllama.formats.hf import EXPECTED, export_hf, is_hf_folder, prepare_hf
from slowllama.formats.meta import META_FILES, SHARD_RE, export_meta, prepare_meta
from slowllama.model.tokenizer import TOKENIZER_FILES
from slowllama.store.manifest import MANIFEST
from slowllama.store.quantized import Quantization
from slowllama.store.safe_files import check_regular
from slowllama.store.store import Store


def detect_format(src: Path) -> str:
    """'meta' or 'hf', by the files in the folder."""
    src = Path(src)
    if not src.is_dir():
        raise SlowllamaError(f"{src}: no such folder")
    if (src / MANIFEST).is_file():
        raise SlowllamaError(f"{src}: is a slowllama store already, not a checkpoint folder")
    if (src / "params.json").is_file() or any(SHARD_RE.match(p.name) for p in src.iterdir()):
        return "meta"
    if is_hf_folder(src):
        return "hf"
    raise SlowllamaError(f"{src}: neither a Meta Llama folder (expected {META_FILES}) nor a Hugging Face "
                         f"folder (expected {EXPECTED})")


def prepare(src: Path, dest: Path, dtype: Optional[str] = None, force: bool = False,
            log: Callable[[str], None] = print, quantization: Optional[Quantization] = None) -> Path:
    """Stream a Meta or Hugging Face folder (detected by its files) into a new store; `quantization`: its
    blocks' linear weights stored so (store/quantized.py)."""
    fmt = detect_format(src)
    for name in TOKENIZER_FILES:  # a FIFO or a folder by a tokenizer file's name: refused, not skipped
        if (Path(src) / name).exists() and not (Path(src) / name).is_file():
            check_regular(Path(src) / name)
    if fmt == "hf":
        return prepare_hf(src, dest, dtype=dtype, force=force, log=log, quantization=quantization)
    return prepare_meta(src, dest, dtype=dtype, force=force, log=log, quantization=quantization)


def export(store_path: Path, out: Path, format: Optional[str] = None, shards: Optional[int] = None,
           max_shard_size: Optional[str] = None, dtype: Optional[str] = None, force: bool = False,
           log: Callable[[str], None] = print) -> Path:
    """Write a store as a Meta or Hugging Face folder (default: the format it was prepared from), or as
    one GGUF file (OUT if it ends in .gguf, else OUT/model.gguf)."""
    fmt = format or Store.open(store_path).source.format
    if fmt == "gguf":
        for flag, value in (("--shards", shards), ("--max-shard-size", max_shard_size)):
            if value is not None:
                raise SlowllamaError(f"{flag}: does not apply to --format gguf (one file)")
        return export_gguf(store_path, out, dtype=dtype, force=force, log=log)
    if fmt == "hf":
        return export_hf(store_path, out, shards=shards, max_shard_size=max_shard_size, dtype=dtype, force=force,
                         log=log)
    if fmt != "meta":
        raise SlowllamaError(f"--format: unknown format {fmt!r} (choose from hf, meta, gguf)")
    if max_shard_size is not None:
        raise SlowllamaError("--max-shard-size: applies to --format hf (Meta's shards are cuts of every tensor; "
                             "use --shards)")
    return export_meta(store_path, out, shards=shards, dtype=dtype, force=force, log=log)
