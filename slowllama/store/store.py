"""The on-disk store: one safetensors file per module, a JSON manifest, atomic commits, one writer.

Layout of a store folder:
    manifest.json                 model args, store dtype, source layout, file table, step, run state
    tokenizer.model (or the source's tokenizer files: tokenizer.json, tokenizer_config.json, ...)
    config.json, generation_config.json, model.safetensors.index.json   (a Hugging Face source's, verbatim)
    modules/<name>@<gen>.safetensors  weights of tok_embeddings, layers.N, head (and extras); in a store prepared
                                  with --quantize, the blocks' linear weights packed (store/quantized.py)
    modules/<name>@<gen>.rows.safetensors  a row patch: ids and new values of the rows step <gen> changed
    optim/<name>#<i>@<gen>.safetensors  optimizer state of a module, part i: rows of one weight (AdamW moments, step)
    master/<name>#<i>@<gen>.safetensors fp32 master weights of a 16-bit store, in the same parts (optional)
    journal.json                  present while a step is being written
    manifest.prepared.json        a share's next manifest, between the two phases of a commit across hosts
    scratch/                      spilled activations of the running step
    run/                          logs of training runs: settings, metrics.jsonl
    lock                          pid of the process that writes the store

A step writes every updated module to a new file (a new <gen>), or only its changed rows to a
row patch that reads apply on top of the module's file (the manifest lists them in order), then
commits by replacing the manifest atomically (write, fsync, rename, fsync the folder) once every
file is fsynced; only then are the files the new manifest no longer names removed. Files the
manifest does not name are garbage of an interrupted step, removed when the store is next opened
for writing. So the store is always entirely at one step.
Only this package touches module files: Store here, StoreBuilder (builder.py) for a new store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

from slowllama.errors import SlowllamaError
from slowllama.faults import fault_point
from slowllama.jsonfile import read_json
from slowllama.model.args import ModelArgs, dtype_from_name
from slowllama.model.shapes import module_names, module_shapes
from slowllama.sizes import format_size
from slowllama.store import safetensors_io as st
from slowllama.store.atomic import fsync_dir, signals_deferred, write_json_atomic
from slowllama.store.guards import check_free_space, disk_full_error
from slowllama.store.lock import StoreLock
from slowllama.store.manifest import (COPIED, JOURNAL, KINDS, MANIFEST, STATE_KINDS, FileEntry, Manifest, RunRecord,
                                      SourceRecord)
from slowllama.store.quantized import Quantization, dequantized, stored_specs, weight_bytes
from slowllama.store.safe_files import check_regular
from slowllama.store.shares import PREPARED, ShareRecord, share_of
from slowllama.store.state_parts import (DEFAULT_PART_ELEMENTS, StatePart, part_module, piece_name, split_piece,
                                        state_parts)

# paths a writer creates or writes through: none may be a symbolic link (it would lead the writes outside)
OWN_PATHS = (MANIFEST, JOURNAL, PREPARED, "lock", *KINDS, "scratch", "run", "run/settings.json", "run/metrics.jsonl")


class Store:
    """A store folder, opened read-only or for writing (then locked, and recovered if a step was cut off)."""

    def __init__(self, path: Path, manifest: Manifest, writable: bool, co_writer: bool = False):
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        self.co_writer = co_writer  # a rank > 0: writes its own modules' files, which rank 0 commits
        self.share: Optional[ShareRecord] = share_of(manifest, str(self.path / MANIFEST))  # None: a whole store
        self._prepared: Optional[tuple] = None  # (manifest, pending, old files) of phase 1 of a commit across hosts
        self.lock: Optional[StoreLock] = None
        self.scratch_elsewhere: Optional[Path] = None  # spilled activations of a store opened read-only
        self.verify = True  # check size + checksum of every file read
        self.drop_cache = False  # evict files from the page cache after reading or writing them
        self.bytes_read = 0
        self.bytes_written = 0
        self._pending: dict[tuple[str, str], FileEntry] = {}  # (kind, name) -> entry written this step
        self._written: set[str] = set()  # files written since the last commit (a rollback removes them)
        self._pending_lock = threading.Lock()
        self._fsync_dirs: set[Path] = set()
        # fsyncs of written files run here, so that the disk flushes one file while the writer fills the
        # page cache with the next; commit() waits for them all before the manifest's rename
        self._syncer: Optional[ThreadPoolExecutor] = None
        self._syncing: list[tuple[str, Future]] = []
        self._assembling: dict[tuple[str, str], tuple[str, st.PieceWriter]] = {}  # (kind, module) -> its new file
        self._verified: set[tuple[str, str]] = set()  # whole-file checksums checked for reads of single tensors
        self._last_dequantized: tuple = (None, None)  # ((module, key, entry), weight) of read_slice

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path, writable: bool = False, log: Callable[[str], None] = print,
             follower: bool = False, co_writer: bool = False, share_ok: bool = False,
             recover: bool = True) -> "Store":
        """Open a store; writable: lock it (one writer) and clean up after an interrupted step.

        A read-only open refuses a store that a finetune is writing (its files change at every step),
        unless it is a `follower`: a rank > 0 of that finetune, which rank 0 opened (locked and recovered)
        first. A co_writer follower also writes the files of the modules it owns, never the manifest: at each
        commit it hands their entries to rank 0 (durable()) and takes rank 0's new manifest (adopt()).
        A share of a split store (store/shares.py) is refused unless share_ok (a finetune across hosts, which
        opens a share's writer with recover=False: the hosts agree on the recovery first, recover_share()).
        """
        path = Path(path)
        if not path.is_dir():
            raise SlowllamaError(f"{path}: no such store folder")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise SlowllamaError(f"{path}: not a slowllama store (no {MANIFEST}; run `slowllama prepare` first)")
        store = cls(path, Manifest.read(path), writable or co_writer, co_writer)
        if store.share is not None and not share_ok:
            raise SlowllamaError(f"{path}: the share of host {store.share.host} of a store split across "
                                 f"{store.share.layout()}, holding only its own ranks' modules: train it under "
                                 "torchrun with the other hosts' shares, or join the shares first (slowllama join)")
        follower = follower or co_writer
        if writable:
            store._refuse_symlinks()
            store.lock = StoreLock(path)
            store.lock.acquire(log)
            if recover:
                store._recover(log)
                store._split_whole_state(log)
        elif not follower:
            StoreLock(path).refuse_if_written()
        if not follower:
            try:
                store.check_side_files()
            except BaseException:
                store.close()
                raise
        return store

    def check_side_files(self) -> None:
        """Check what every command reads beside the modules: the files copied from the source (tokenizer,
        config.json ...) against the manifest's sizes and checksums, and the extras module (rope.freqs)."""
        copied = self.manifest.extra.get(COPIED)
        recorded = self.source.tokenizer_files
        names = (recorded if isinstance(recorded, list) else []) + list(self.source.files or [])
        for name in names if copied is not None else []:  # (stores made before the table: not recorded)
            if not isinstance(name, str) or Path(name).name != name:
                raise SlowllamaError(f"{self.path / MANIFEST}: a tokenizer file (or source file) {name!r} that is "
                                     "not a file of the store's folder")
            if name not in copied and (self.path / name).exists():
                raise SlowllamaError(f"{self.path / name}: a tokenizer file (or source file) not in the manifest's "
                                     "table of copied files (added by hand?)")
        for name, entry in (copied or {}).items():
            path = self.path / name
            if path.is_symlink():
                raise SlowllamaError(f"{path}: a symbolic link; a store's own files must lie inside it")
            if not path.exists():
                raise SlowllamaError(f"{path}: missing (the manifest's copied_files names it)")
            check_regular(path)
            data = path.read_bytes()
            if len(data) != entry["bytes"]:
                raise SlowllamaError(f"{path}: size {len(data)} bytes, the manifest says {entry['bytes']} "
                                     "(truncated or altered)")
            if st.Hasher(data).hexdigest() != entry["xxh3"]:
                raise SlowllamaError(f"{path}: checksum mismatch (altered or corrupted outside slowllama)")
        if self.has("extras"):  # size, checksum and header; not one of the run's reads (bytes_read)
            info = self.file_info("extras")
            expect = (info.bytes, info.xxh3, info.tensors) if self.verify else None
            st.read_file(str(self.file_path(info)), expect=expect)

    def _refuse_symlinks(self) -> None:
        """A writer writes and deletes files in these places: each must be the store's own, not a link."""
        for rel in OWN_PATHS:
            if (self.path / rel).is_symlink():
                raise SlowllamaError(f"{self.path / rel}: a symbolic link; a store's own files and folders "
                                     "must lie inside it (remove the link)")

    def _recover(self, log) -> None:
        """Remove what an interrupted step left behind: files the committed manifest does not name."""
        journal = self.path / JOURNAL
        referenced = self.manifest.named_files()
        removed = 0
        for kind in KINDS:
            folder = self.path / kind
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f"{kind}/{f.name}" not in referenced and not f.is_dir():  # a link is removed, not followed
                    f.unlink()
                    removed += 1
        for tmp in (MANIFEST, JOURNAL, PREPARED):  # a rename that never happened
            with contextlib.suppress(FileNotFoundError):
                (self.path / f"{tmp}.tmp").unlink()
        if journal.exists():
            try:
                j = read_json(journal)
                cut = j.get("step", "?") if isinstance(j, dict) else "?"
            except SlowllamaError:
                cut = "?"
            if cut == self.step:
                log(f"recovered: step {cut} was committed; finished its clean-up ({removed} old files removed)")
            else:
                log(f"recovered: rolled back the interrupted step {cut}; the store is at step {self.step} "
                    f"({removed} partial files removed)")
            journal.unlink()
            fsync_dir(self.path)
        elif removed:
            log(f"recovered: removed {removed} files an interrupted step left; the store is at step {self.step}")
        shutil.rmtree(self.path / "scratch", ignore_errors=True)

    def _split_whole_state(self, log) -> None:
        """Stores written before state parts hold a module's optimizer state (or master weights) in one file:
        split each into its parts, one commit per file at the same step (the disk holds one file twice at most;
        cut off, the next open goes on)."""
        whole = [(kind, name) for kind in STATE_KINDS for name in self.manifest.files.get(kind, {})
                 if name in self.expected_shapes]
        for kind, name in whole:
            tensors = self.read(name, kind)
            for part in self.state_parts(name):
                self.write(part.name, part_tensors(tensors, part, kind), kind, gen=self.step)
            self.commit(self.step, remove=[(kind, name)])
        if whole:
            log(f"split {len(whole)} files of optimizer state or master weights into parts (the store's new layout)")

    def close(self) -> None:
        if self._syncer is not None:
            self.sync(errors=False)  # uncommitted files: the next open removes them
            self._syncer.shutdown()
            self._syncer = None
        if self.lock:
            self.lock.release()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- what it holds ---------------------------------------------------------------------
    @property
    def args(self) -> ModelArgs:
        return self.manifest.args

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.manifest.dtype)

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def run(self) -> Optional[RunRecord]:
        """The training run the store is in (None before a run's first commit)."""
        return self.manifest.run

    @property
    def source(self) -> SourceRecord:
        """What prepare recorded of the source checkpoint (an empty record if nothing was)."""
        return self.manifest.source or SourceRecord({})

    @functools.cached_property
    def quantization(self) -> Optional[Quantization]:
        """How the blocks' linear weights are stored (store/quantized.py): None, in the store's dtype."""
        return self.manifest.quantization

    @functools.cached_property
    def stored_specs(self) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
        """{module: {key: (dtype, shape)}} of the tensors in the module files (a quantized weight: packed bytes)."""
        return {name: stored_specs(self.args, name, self.dtype, self.quantization) for name in self.expected_shapes}

    @property
    def has_master_weights(self) -> bool:
        """Whether the store holds fp32 master weights (a run with --master-weights fp32 wrote them)."""
        return bool(self.manifest.files.get("master"))

    @property
    def scratch(self) -> Path:
        """Where spilled activations go (created by the first spill): STORE/scratch, or for a store that is
        only read (LoRA) the folder set in scratch_elsewhere, so that not one byte is written to the store."""
        return self.scratch_elsewhere or self.path / "scratch"

    @property
    def run_dir(self) -> Path:
        p = self.path / "run"
        p.mkdir(exist_ok=True)
        return p

    def has(self, name: str, kind: str = "modules") -> bool:
        name = split_piece(name)[0]
        with self._pending_lock:
            if (kind, name) in self._pending:
                return True
        return name in self.manifest.files.get(kind, {})

    def file_info(self, name: str, kind: str = "modules") -> FileEntry:
        """The entry of a module's (or state part's) file: the one written this step, else the committed one."""
        name = split_piece(name)[0]
        with self._pending_lock:
            info = self._pending.get((kind, name))
        if info is None:
            info = self.manifest.files.get(kind, {}).get(name)
        if info is None:
            raise SlowllamaError(f"{self.path}: the store has no {kind} file for {name!r}")
        return info

    @property
    def state_part_elements(self) -> int:
        return self.manifest.state_part_elements or DEFAULT_PART_ELEMENTS

    def state_parts(self, module: str) -> list[StatePart]:
        """The parts a module's optimizer state and master weights are kept in."""
        return self._parts[module]

    @functools.cached_property
    def _parts(self) -> dict[str, list[StatePart]]:
        return {name: state_parts(name, shapes, self.state_part_elements)
                for name, shapes in self.expected_shapes.items()}

    @functools.cached_property
    def _part_by_name(self) -> dict[str, StatePart]:
        return {p.name: p for parts in self._parts.values() for p in parts}

    def module_bytes(self, name: str, kind: str = "modules") -> int:
        return self.file_info(name, kind).bytes

    def key_bytes(self, name: str, kind: str = "modules") -> int:
        """Bytes a read of `name` brings in: a module's (or part's) file, or one weight of a module."""
        module, key = split_piece(name)
        if key is not None:
            return weight_bytes(self.args, module, key, self.dtype, self.quantization)
        return self.file_info(name, kind).bytes

    # ---- reading and writing -----------------------------------------------------------------
    def file_path(self, info: FileEntry) -> Path:
        """The path of a manifest entry, refused unless it is a plain file inside the store (no links)."""
        path = self.path / info.file
        if path.is_symlink() or not os.path.realpath(path).startswith(os.path.realpath(self.path) + os.sep):
            raise SlowllamaError(f"{path}: a symbolic link or a path that leads outside the store; "
                                 "module files must be plain files inside it")
        if not path.exists():
            on_disk = self._step_on_disk()
            if on_disk is not None and on_disk != self.step:
                raise SlowllamaError(f"{path}: module file missing: the store moved from step {self.step} to "
                                     f"{on_disk} while it was read (a finetune wrote it)")
        return path

    def _step_on_disk(self) -> Optional[int]:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            return int(json.loads((self.path / MANIFEST).read_text())["step"])
        return None

    def read(self, name: str, kind: str = "modules",
             alloc: Optional[Callable[[int], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """The tensors of one module file (CPU, one buffer).

        Checked against the manifest's size and hash, and against the model's names and shapes.
        """
        module, key = split_piece(name)
        if key is not None:
            return {key: self._read_piece(module, key, kind, alloc)}
        info = self.file_info(name, kind)
        tensors, path = self._read_entry(info, alloc)
        self._check_shapes(name, kind, tensors, path)
        for patch in info.rows:
            self._apply_rows(tensors, patch)
        return tensors

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """A module's weights (CPU), in the store's dtype: read(), with quantized weights dequantized."""
        module = split_piece(name)[0]
        return dequantized(self.quantization, module, self.read(name), self.expected_shapes.get(module, {}),
                           self.dtype)

    def _read_piece(self, module: str, key: str, kind: str, alloc=None) -> torch.Tensor:
        """One weight of a module file on its own: checked by its own checksum, or (a file with one checksum for
        the whole) by hashing the whole file once per process."""
        info = self.file_info(module, kind)
        path = self.file_path(info)
        digest = info.tensors.get(key) if info.tensors else None
        if self.verify and digest is None and (info.file, info.xxh3) not in self._verified:
            size, whole = st.hash_file(str(path))
            if size != info.bytes or whole != info.xxh3:
                raise SlowllamaError(f"{path}: size or checksum differ from the manifest's (truncated or altered)")
            self._verified.add((info.file, info.xxh3))
        t = st.read_tensor(str(path), key, alloc, digest if self.verify else None, self.drop_cache)
        self.bytes_read += t.numel() * t.element_size()
        tensors = {key: t}
        self._check_shapes(module, kind, tensors, path, partial=True)
        for patch in info.rows:
            self._apply_rows(tensors, patch, others=set(self.expected_shapes[module]) - {key})
        return t

    def _read_entry(self, info: FileEntry, alloc=None) -> tuple[dict[str, torch.Tensor], Path]:
        expect = (info.bytes, info.xxh3, info.tensors) if self.verify else None
        path = self.file_path(info)
        tensors = st.read_file(str(path), alloc=alloc, expect=expect, drop_cache=self.drop_cache)
        self.bytes_read += info.bytes
        return tensors, path

    def read_state(self, name: str, kind: str = "optim") -> dict[str, torch.Tensor]:
        """A module's whole optimizer state (or master weights), its parts joined (AdamW's step: the first part's)."""
        pieces: dict[str, list[torch.Tensor]] = {}
        for part in self.state_parts(name):
            for key, t in self.read(part.name, kind).items():
                if key != "step" or key not in pieces:
                    pieces.setdefault(key, []).append(t)
        return {k: p[0] if len(p) == 1 else torch.cat(p) for k, p in pieces.items()}

    def _apply_rows(self, tensors: dict[str, torch.Tensor], patch: FileEntry, others: frozenset = frozenset()) -> None:
        """Apply a row patch (written by write_rows) to a module's tensors, checked like any file. others: the
        module's weights not in `tensors` (one weight read on its own), whose rows are left."""
        rows, path = self._read_entry(patch)
        for key in [k[:-len(".ids")] for k in rows if k.endswith(".ids")]:
            ids, values = rows[f"{key}.ids"], rows.get(f"{key}.rows")
            if key in others:
                continue
            target = tensors.get(key)
            if (target is None or values is None or ids.dtype != torch.int64 or ids.dim() != 1
                    or values.dtype != target.dtype or tuple(values.shape) != (len(ids), *target.shape[1:])
                    or (len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < target.shape[0])):
                raise SlowllamaError(f"{path}: the rows of {key!r} do not fit the module (altered outside slowllama)")
            target[ids] = values

    def _check_shapes(self, name: str, kind: str, tensors: dict, path: Path, partial: bool = False) -> None:
        """Refuse a file whose tensors are not the module's (a store edited outside slowllama); partial: some of
        its tensors, read on their own."""
        part = self._part_by_name.get(name) if kind in STATE_KINDS else None
        if part is not None:
            expected = {part.key: part.shape}
        elif name in self.expected_shapes and kind in KINDS:
            expected = self.expected_shapes[name]  # a module (or, before parts, a module's whole state)
            if kind == "modules":
                expected = {k: shape for k, (_, shape) in self.stored_specs[name].items()}
        else:
            return  # extras: the source's own keys
        for key, t in tensors.items():
            weight = key if kind != "optim" else key.rsplit(".", 1)[0]
            if kind == "optim" and key == "step":
                continue
            if weight not in expected or tuple(t.shape) != expected[weight]:
                raise SlowllamaError(f"{path}: tensor {key!r} {list(t.shape)} is not a weight of {name} "
                                     "(the file does not fit the model)")
            want = self.stored_specs[name][key][0] if kind == "modules" else torch.float32 if kind == "master" \
                else t.dtype
            if t.dtype != want:
                raise SlowllamaError(f"{path}: tensor {key!r} is {t.dtype}, the store holds {want}")
        if kind != "optim" and not partial and set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))
            raise SlowllamaError(f"{path}: tensor {missing[0]!r} missing")

    @functools.cached_property
    def expected_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{module name: {weight name: shape}} of the model the manifest describes."""
        return {name: module_shapes(self.args, name) for name in module_names(self.args)}

    def read_slice(self, name: str, key: str, dim: Optional[int] = None, start: int = 0,
                   length: Optional[int] = None, kind: str = "modules") -> torch.Tensor:
        """One tensor of a module file, or a slice of it along `dim`, read by mmap (export's access); a quantized
        weight is read whole and dequantized, in the store's dtype."""
        info = self.file_info(name, kind)
        if kind == "modules" and self.quantization is not None and self.quantization.covers(name, key):
            if self._last_dequantized[0] != (name, key, info):  # export reads a weight by slices, one after another
                self._last_dequantized = ((name, key, info), self.weights(piece_name(name, key))[key])
            t = self._last_dequantized[1]
            return t if dim is None else t.narrow(dim, start, length)
        if info.rows:  # patched rows: the whole tensor, as read() makes it
            t = self.read(name, kind)[key]
            return t if dim is None else t.narrow(dim, start, length)
        with safe_open(str(self.file_path(info)), framework="pt") as f:
            if dim is None:
                return f.get_tensor(key)
            sl = f.get_slice(key)
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, start + length)
            return sl[tuple(index)]

    def begin_step(self, step: int) -> None:
        """Mark that step `step` is being written; a crash from here on is rolled back at next open."""
        self._require_writable()
        try:
            write_json_atomic(self.path / JOURNAL, {"step": step, "pid": os.getpid(), "time": time.time()})
            fault_point("store.begin_step")
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                (self.path / JOURNAL).unlink()
            if e.errno == errno.ENOSPC:
                raise disk_full_error(e, str(self.path / JOURNAL)) from None
            raise

    def write(self, name: str, tensors: dict[str, torch.Tensor], kind: str = "modules",
              gen: Optional[int] = None) -> FileEntry:
        """Write a module's tensors to a new file of generation `gen` (default: the next step).

        Thread-safe, so a background writer may call it. The file joins the store at commit().
        """
        gen = self.step + 1 if gen is None else gen
        module, key = split_piece(name)
        if key is not None:
            return self._write_piece(module, key, tensors[key], kind, gen)
        info = self._write_file(f"{kind}/{name}@{gen}.safetensors", tensors)
        with self._pending_lock:
            self._pending[(kind, name)] = info
        return info

    def _write_piece(self, module: str, key: str, tensor: torch.Tensor, kind: str, gen: int) -> Optional[FileEntry]:
        """Write one weight of a module into the module's new file (created at its first weight); the file joins
        the step's files once every weight is in (commit() copies the ones a step did not write)."""
        self._require_writable()
        rel = f"{kind}/{module}@{gen}.safetensors"
        with self._pending_lock:
            started = self._assembling.get((kind, module))
        try:
            fault_point("store.write.before")
            if started is None:
                (self.path / kind).mkdir(exist_ok=True)
                specs = self.stored_specs[module]
                writer = st.PieceWriter(str(self.path / rel), specs)
                with self._pending_lock:
                    self._assembling[(kind, module)] = (rel, writer)
                    self._written.add(rel)
            else:
                writer = started[1]
            writer.write(key, tensor.cpu())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full_error(e, str(self.path / rel)) from None
            raise
        fault_point("store.write.after")
        if writer.missing:
            return None
        return self._finish_piece_file(kind, module)

    def _finish_piece_file(self, kind: str, module: str) -> FileEntry:
        with self._pending_lock:
            rel, writer = self._assembling.pop((kind, module))
            info = FileEntry(rel, writer.size, "", tensors=dict(writer.digests))
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowllama-fsync")
            self._syncing.append((rel, self._syncer.submit(st.fsync_file, str(self.path / rel), self.drop_cache)))
            self._fsync_dirs.add(self.path / kind)
            self.bytes_written += writer.size
            self._pending[(kind, module)] = info
        return info

    def _complete_piece_files(self) -> None:
        """Module files begun weight by weight this step: copy in the weights the step did not write."""
        with self._pending_lock:
            started = list(self._assembling.items())
        for (kind, module), (_, writer) in started:
            for key in writer.missing:
                writer.write(key, self._read_piece(module, key, kind))
            self._finish_piece_file(kind, module)

    def rows_worth_writing(self, name: str, nbytes: int, kind: str = "modules") -> bool:
        """Whether a row patch of nbytes beats rewriting the module: patches stay under a quarter of its size
        (past that, the next write is the whole module, and the patches go)."""
        info = self.file_info(name, kind)
        return sum(p.bytes for p in info.rows) + nbytes <= info.bytes // 4

    def write_rows(self, name: str, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], kind: str = "modules",
                   gen: Optional[int] = None) -> FileEntry:
        """Write only some rows of a module's weights: rows = {key: (row ids, their new values)}.

        A row patch file of generation `gen`, applied on top of the module's file (and its earlier
        patches) by every read; like write(), it joins the store at commit().
        """
        gen = self.step + 1 if gen is None else gen
        tensors = {}
        for key, (ids, values) in rows.items():
            tensors[f"{key}.ids"], tensors[f"{key}.rows"] = ids.to(torch.int64), values
        patch = self._write_file(f"{kind}/{name}@{gen}.rows.safetensors", tensors)
        with self._pending_lock:
            base = self._pending.get((kind, name)) or self.manifest.files[kind][name]
            info = dataclasses.replace(base, rows=(*base.rows, patch))
            self._pending[(kind, name)] = info
        return info

    def _write_file(self, rel: str, tensors: dict[str, torch.Tensor]) -> FileEntry:
        """Write one file of the store (not yet durable: a background fsync, which commit() waits for)."""
        self._require_writable()
        folder = self.path / Path(rel).parent
        folder.mkdir(exist_ok=True)
        try:
            fault_point("store.write.before")
            size, digest = st.write_file(str(self.path / rel), {k: v.cpu() for k, v in tensors.items()},
                                         fsync=False)
        except BaseException as e:
            with contextlib.suppress(OSError):
                (self.path / rel).unlink()  # a partial file
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise disk_full_error(e, str(self.path / rel)) from None
            raise
        fault_point("store.write.after")
        with self._pending_lock:
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowllama-fsync")
            self._syncing.append((rel, self._syncer.submit(st.fsync_file, str(self.path / rel), self.drop_cache)))
            self._written.add(rel)
            self._fsync_dirs.add(folder)
            self.bytes_written += size
        return FileEntry(rel, size, digest)

    def durable(self) -> list[tuple[str, str, dict]]:
        """Make every file written since the last commit durable (the files and their folders fsynced); their
        entries, (kind, name, entry as JSON), which a commit adds to the manifest (a co-writer's, by rank 0)."""
        self._require_writable()
        self._complete_piece_files()
        self.sync()
        with self._pending_lock:
            pending = dict(self._pending)
            dirs, self._fsync_dirs = self._fsync_dirs, set()
        for d in dirs:
            fsync_dir(d)
        return [(kind, name, info.to_json()) for (kind, name), info in pending.items()]

    def commit(self, step: int, run: Optional[RunRecord] = None, remove: tuple = (),
               shared: tuple = ()) -> None:
        """Make every file written since the last commit part of the store, at step `step`, atomically.

        run: the run record, committed in the same atomic write (None: the store's stays as it is);
        remove: (kind, name) entries that leave the store, their files deleted once committed;
        shared: the durable() entries of the co-writers (other ranks), committed too; each co-writer deletes the
        files its entries replace once it has adopted the new manifest.
        """
        manifest, pending, old_files = self._next_manifest(step, run, remove, shared)
        with signals_deferred():  # a second Ctrl-C lands before or after the commit, never inside it
            try:
                write_json_atomic(self.path / MANIFEST, manifest.to_json(), fault="store.commit")
            except OSError as e:
                if self._step_on_disk() != step:  # the rename did not happen: nothing was committed
                    if e.errno == errno.ENOSPC:
                        raise disk_full_error(e, str(self.path / MANIFEST)) from None
                    raise
                self._committed(manifest, pending)  # renamed, but the folder's fsync failed
                raise
            self._committed(manifest, pending)
            self._remove_old(old_files)

    def _next_manifest(self, step: int, run: Optional[RunRecord], remove: tuple, shared: tuple):
        """The manifest a commit makes current (after making this process's files durable), the entries written
        here that it takes in, and the files it no longer names that this process deletes once it is current."""
        self._require_writable()
        if self.co_writer:
            raise SlowllamaError(f"{self.path}: a co-writer hands its files to rank 0, which commits")
        self.durable()
        with self._pending_lock:
            pending = dict(self._pending)  # they stay pending (rollback removes them) until the rename
        old_files = []
        files = {kind: dict(entries) for kind, entries in self.manifest.files.items()}
        for kind, name, entry in shared:
            if (kind, name) in pending or kind not in KINDS or part_module(name) not in self.expected_shapes:
                raise SlowllamaError(f"{self.path}: a rank wrote {kind}/{name}, which is not its to write")
            files.setdefault(kind, {})[name] = FileEntry.from_json(entry)
        for (kind, name), info in pending.items():
            prev = files.setdefault(kind, {}).get(name)
            if prev:
                old_files += [f for f in prev.files() if f not in info.files()]
            files[kind][name] = info
        for kind, name in remove:
            old_files += files[kind].pop(name).files()
        manifest = dataclasses.replace(self.manifest, files=files, step=step,
                                       run=self.manifest.run if run is None else run)
        return manifest, pending, old_files

    def _remove_old(self, old_files: list[str]) -> None:
        for rel in old_files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / rel).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.path / JOURNAL).unlink()

    # ---- a commit across hosts (a share's writer; train/checkpoints.py runs the two phases) -------------------
    def prepare_commit(self, step: int, run: Optional[RunRecord] = None, shared: tuple = ()) -> None:
        """Phase 1: write the manifest commit() would make current, durably, beside the current one (PREPARED).
        From here a restart of every host rolls this step forward if every host prepared it (recover_share)."""
        manifest, pending, old_files = self._next_manifest(step, run, (), shared)
        try:
            write_json_atomic(self.path / PREPARED, manifest.to_json(), fault="store.prepare")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full_error(e, str(self.path / PREPARED)) from None
            raise
        self._prepared = (manifest, pending, old_files)

    def prepared_json(self) -> dict:
        """The manifest of phase 1, as written."""
        return self._prepared[0].to_json()

    def commit_prepared(self) -> None:
        """Phase 2, once every host has prepared the step: the prepared manifest becomes the current one."""
        manifest, pending, old_files = self._prepared
        with signals_deferred():
            fault_point("store.commit.before_rename")
            os.replace(self.path / PREPARED, self.path / MANIFEST)
            fault_point("store.commit.after_rename")
            self._prepared = None
            self._committed(manifest, pending)
            fsync_dir(self.path)
            self._remove_old(old_files)

    def drop_prepared(self) -> None:
        """Another host failed phase 1: the step is not committed anywhere (its files go with rollback())."""
        self._prepared = None
        with contextlib.suppress(FileNotFoundError):
            (self.path / PREPARED).unlink()

    def prepared_step(self) -> Optional[int]:
        """The step of a manifest prepared and not made current (a commit across hosts cut off); None: none."""
        if not (self.path / PREPARED).is_file():
            return None
        return Manifest.read_file(self.path / PREPARED).step

    def recover_share(self, forward: bool, log) -> None:
        """Finish a commit across hosts that was cut off, as every host agreed (store/shares.recovery): the
        prepared manifest made current (forward) or removed; then the clean-up of an interrupted step."""
        if forward and (self.path / PREPARED).is_file():  # (a host that made it current already has none)
            prepared = Manifest.read_file(self.path / PREPARED)
            os.replace(self.path / PREPARED, self.path / MANIFEST)
            fsync_dir(self.path)
            self.manifest = prepared
            log(f"recovered: every host had prepared step {prepared.step}; committed it on this host too")
        elif (self.path / PREPARED).exists():
            (self.path / PREPARED).unlink()
            fsync_dir(self.path)
        self._recover(log)

    def adopt(self, manifest_json: dict) -> None:
        """A co-writer: rank 0 committed the manifest `manifest_json`, with this process's files in it; take it,
        and delete the files it no longer names that this process's entries replaced."""
        fault_point("store.adopt")
        manifest = Manifest.from_json(manifest_json, str(self.path / MANIFEST))
        with self._pending_lock:
            pending = dict(self._pending)
        old_files = []
        for (kind, name), info in pending.items():
            prev = self.manifest.files.get(kind, {}).get(name)
            committed = manifest.files.get(kind, {}).get(name)
            if committed is None or committed.files() != info.files():
                raise SlowllamaError(f"{self.path}: rank 0 committed another {kind}/{name} than this rank wrote")
            if prev:
                old_files += [f for f in prev.files() if f not in info.files()]
        self._committed(manifest, pending)
        for rel in old_files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / rel).unlink()

    def _committed(self, manifest: Manifest, pending: dict[tuple[str, str], FileEntry]) -> None:
        self.manifest = manifest
        with self._pending_lock:
            for key, info in pending.items():
                self._pending.pop(key, None)
                self._written.difference_update(info.files())

    def sync(self, errors: bool = True) -> None:
        """Wait until every file written so far is durable; raises the first fsync's error (if errors)."""
        with self._pending_lock:
            syncing, self._syncing = self._syncing, []
        first = None
        for rel, future in syncing:
            try:
                future.result()
            except OSError as e:
                if first is None:
                    first = disk_full_error(e, str(self.path / rel)) if e.errno == errno.ENOSPC else e
        if first is not None and errors:
            raise first

    def rollback(self) -> None:
        """Drop every file written since the last commit (the step failed before committing)."""
        self.sync(errors=False)
        with self._pending_lock:
            written, self._written, self._pending = self._written, set(), {}
            self._assembling.clear()
        for rel in written:
            with contextlib.suppress(FileNotFoundError):
                (self.path / rel).unlink()
        if not self.co_writer:  # the journal is rank 0's
            with contextlib.suppress(FileNotFoundError):
                (self.path / JOURNAL).unlink()

    def update_manifest(self, updates: dict) -> None:
        """Change manifest fields (not the file table) atomically: updates = {JSON field: value}."""
        self._require_writable()
        manifest = Manifest.from_json({**self.manifest.to_json(), **updates}, str(self.path / MANIFEST))
        write_json_atomic(self.path / MANIFEST, manifest.to_json())
        self.manifest = manifest

    def _require_writable(self) -> None:
        if not self.writable:
            raise SlowllamaError(f"{self.path}: store opened read-only")

    def check_step_space(self, optim_bytes_per_weight: int, master_bytes_per_weight: int, spill_bytes: int) -> None:
        """Refuse to start training when one step's new files would not fit on the store's disk.

        A step writes new module files (and optimizer state, master weights) beside the committed
        ones, which go only once it commits; activations beyond the memory budget go to scratch/. (A share: the
        files of its own host's modules.)
        """
        modules = sum(info.bytes for name, info in self.manifest.files["modules"].items()
                      if name in self.expected_shapes
                      and (self.share is None or self.share.host_of(name) == self.share.host))
        weights = modules // st.element_size(self.dtype)
        parts = {"new module files": modules, "optimizer state": weights * optim_bytes_per_weight,
                 "master weights": weights * master_bytes_per_weight, "spilled activations": spill_bytes}
        detail = ", ".join(f"{what} {format_size(n)}" for what, n in parts.items() if n)
        check_free_space(self.path, sum(parts.values()) + (1 << 20), "a training step", detail)

    def locked_by(self, pid: int) -> bool:
        """Whether process `pid` holds this store folder's lock (it is this very folder, not a copy of it)."""
        return StoreLock(self.path).held_by(pid)

    def holds_every_file(self) -> bool:
        """Whether every file the manifest names is here at its size (a copy of the store will do for reading)."""
        try:
            return all((self.path / f.file).stat().st_size == f.bytes for entries in self.manifest.files.values()
                       for entry in entries.values() for f in (entry, *entry.rows))
        except OSError:
            return False

    def evict_from_page_cache(self) -> None:
        """Evict every file the manifest names from the page cache: the next reads come from the disk."""
        for rel in self.manifest.named_files():
            st.evict_file(str(self.path / rel))

    def verify_all(self, progress=None) -> list[str]:
        """Check the size and checksum of every file the manifest names; returns the problems found."""
        problems = []
        entries = self.manifest.entries()
        for kind, name in (progress(entries) if progress else entries):
            try:
                self.read(name, kind)
            except SlowllamaError as e:
                problems.append(str(e))
        return problems


def part_tensors(tensors: dict[str, torch.Tensor], part: StatePart, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of one part, cut from a module's whole optimizer state or master weights: the rows of its
    weight's own tensors (the weight, or `<weight>.<name>` for each state tensor, whatever the optimizer named
    them), and the module's step count where it keeps one."""
    if kind == "master":
        return {part.key: tensors[part.key][part.rows]}
    return {key: t if key == "step" else t[part.rows] for key, t in tensors.items()
            if key == "step" or key.rsplit(".", 1)[0] == part.key}
