"""A new store (prepare, fuse, synthetic benchmarks), built aside and put in place only when complete.

A store that a failed or interrupted prepare leaves is never mistaken for a good one: until
finish() renames it into place it is a hidden folder beside the destination.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from slowllama.errors import SlowllamaError
from slowllama.store import safetensors_io as st
from slowllama.store.atomic import fsync_dir, remove_dead_partials, write_json_atomic
from slowllama.store.manifest import COPIED, MANIFEST, FileEntry, Manifest
from slowllama.store.quantized import FIELD as QUANTIZATION, Quantization
from slowllama.store.safe_files import check_regular, open_new, os_error
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS
from slowllama.store.store import Store


class StoreBuilder:
    """A new store, built in a hidden temporary folder and renamed into place only when complete.

    quantization: the blocks' linear weights are written in the store's dtype, then quantized at finish() (a
    checkpoint's slices of one weight come from several shards: a weight is whole only once all are placed);
    packed: they are written quantized already (a benchmark's random store, quantized on its device).
    """

    def __init__(self, path, force: bool = False, quantization: Optional[Quantization] = None, packed: bool = False):
        self.path = Path(path)
        self.quantization, self.packed = quantization, packed
        if self.path.exists() and not force:
            raise SlowllamaError(f"{self.path}: already exists (use --force to replace it)")
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        remove_dead_partials(self.path)
        if self.tmp.is_symlink():
            self.tmp.unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            (self.tmp / "modules").mkdir(parents=True)
        except OSError as e:
            raise os_error(self.tmp, e, "cannot create the store's folder") from None
        self.files: dict[str, dict[str, FileEntry]] = {"modules": {}}
        self.copied: dict[str, dict] = {}  # the source's files copied verbatim: name -> size and checksum

    def module_writer(self, name: str, specs: dict) -> st.SliceWriter:
        """A writer that fills a module's file piece by piece (prepare places each checkpoint slice)."""
        return st.SliceWriter(str(self.tmp / "modules" / f"{name}@0.safetensors"), specs)

    def finish_module(self, name: str, writer: st.SliceWriter) -> None:
        size, digest = writer.finish()
        self.files["modules"][name] = FileEntry(f"modules/{name}@0.safetensors", size, digest)

    def write_module(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        rel = f"modules/{name}@0.safetensors"
        size, digest = st.write_file(str(self.tmp / rel), tensors)
        self.files["modules"][name] = FileEntry(rel, size, digest)

    def link_module(self, name: str, store: Store, kind: str = "modules") -> None:
        """Take a module file of another store unchanged (a hard link where possible, else a copy)."""
        info = store.file_info(name, kind)
        dest = self.tmp / kind / Path(info.file).name
        dest.parent.mkdir(exist_ok=True)
        if info.rows:  # row patches: one file with them applied
            size, digest = st.write_file(str(dest), store.read(name, kind))
            self.files.setdefault(kind, {})[name] = FileEntry(f"{kind}/{dest.name}", size, digest)
            return
        try:
            os.link(store.path / info.file, dest)
        except OSError:
            shutil.copyfile(store.path / info.file, dest)
        self.files.setdefault(kind, {})[name] = dataclasses.replace(info, file=f"{kind}/{dest.name}")

    def copy_file(self, src: Path, name: str) -> None:
        """Copy a source file (tokenizer, config.json ...) into the store, recording its size and checksum."""
        check_regular(src)
        data = Path(src).read_bytes()
        with open_new(self.tmp / name) as f:
            f.write(data)
        self.copied[name] = {"bytes": len(data), "xxh3": st.Hasher(data).hexdigest()}

    def finish(self, manifest: Manifest) -> Path:
        """Put the store in place: `manifest` gives the model, dtype, source and other fields; the file table
        is the one written here, at step 0, with no run."""
        extra = {k: v for k, v in manifest.extra.items() if k != QUANTIZATION}  # (fuse: of the store it read)
        extra[COPIED] = self.copied
        if self.quantization is not None:
            if not self.packed:
                self._quantize_blocks(self.quantization)
            extra[QUANTIZATION] = self.quantization.to_json()
        manifest = dataclasses.replace(manifest, files=self.files, step=0, run=None, json_order=(), extra=extra,
                                       state_part_elements=manifest.state_part_elements or DEFAULT_PART_ELEMENTS)
        write_json_atomic(self.tmp / MANIFEST, manifest.to_json())
        if self.path.exists():  # --force: the old store goes only once the new one is complete
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def _quantize_blocks(self, quant: Quantization) -> None:
        """Rewrite each block's file with its linear weights quantized (one block in memory at a time)."""
        blocks = [name for name in self.files["modules"] if name.startswith("layers.")]
        for name in tqdm(blocks, desc="quantize", unit="block", disable=None, leave=False):
            entry = self.files["modules"][name]
            path = self.tmp / entry.file
            tensors = st.read_file(str(path), expect=(entry.bytes, entry.xxh3, entry.tensors))
            packed = {k: quant.quantize(t) if quant.covers(name, k) else t for k, t in tensors.items()}
            # the norms first: a packed weight's odd length never leaves a 16-bit tensor off its alignment
            packed = dict(sorted(packed.items(), key=lambda kv: quant.covers(name, kv[0])))
            size, digest = st.write_file(str(path.with_name(path.name + ".q")), packed)
            os.replace(path.with_name(path.name + ".q"), path)
            self.files["modules"][name] = FileEntry(entry.file, size, digest)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
