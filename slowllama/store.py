"""The on-disk store: one safetensors file per module, a JSON manifest, atomic commits, one writer.

Layout of a store folder:
    manifest.json                 model args, store dtype, source layout, file table, step, run state
    tokenizer.model (or the source's tokenizer files)
    modules/<name>@<gen>.safetensors  weights of tok_embeddings, layers.N, head (and extras)
    optim/<name>@<gen>.safetensors    optimizer state of a module (AdamW moments, step)
    master/<name>@<gen>.safetensors   fp32 master weights of a 16-bit store (optional)
    journal.json                  present while a step is being written
    scratch/                      spilled activations of the running step
    run/                          logs of training runs: settings, metrics.jsonl
    lock                          pid of the process that writes the store

A step writes every updated module to a new file (a new <gen>), then commits by replacing the
manifest atomically (write, fsync, rename, fsync the folder); only then are the files of the
previous generation removed. Files the manifest does not name are garbage of an interrupted step,
removed when the store is next opened for writing. So the store is always entirely at one step.
Only this module touches module files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from slowllama.config import ModelArgs, dtype_from_name
from slowllama.errors import SlowllamaError
from slowllama import safetensors_io as st

FORMAT = "slowllama-store"
VERSION = 1
KINDS = ("modules", "optim", "master")  # weights, optimizer state, fp32 master weights
MANIFEST = "manifest.json"
JOURNAL = "journal.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to path by tmp file + fsync + rename + fsync of the folder: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing anything when the disk holding folder has less than `needed` bytes free."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SlowllamaError(f"{what}: not enough free disk at {probe}: needs {needed / 2**30:.2f} GiB, "
                             f"{free / 2**30:.2f} GiB free")


def disk_full_error(e: OSError, what: str) -> SlowllamaError:
    return SlowllamaError(f"{what}: disk full ({e.strerror}); the store stays at its last committed step")


class StoreLock:
    """One writer per store: an exclusive flock on STORE/lock, with the owner's pid in it for messages."""

    def __init__(self, folder: Path):
        self.path = folder / "lock"
        self.fd: Optional[int] = None

    def acquire(self, log: Callable[[str], None]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SlowllamaError(f"{self.path.parent}: in use by another slowllama process (pid {pid})") from None
        old = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if old and old != str(os.getpid()):
            log(f"taking over the lock of pid {old}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Store:
    """A store folder, opened read-only or for writing (then locked, and recovered if a step was cut off)."""

    def __init__(self, path: Path, manifest: dict, writable: bool):
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        self.lock: Optional[StoreLock] = None
        self.verify = True  # check size + checksum of every file read
        self.drop_cache = False  # evict files from the page cache after reading or writing them
        self.bytes_read = 0
        self.bytes_written = 0
        self._pending: dict[tuple[str, str], dict] = {}  # (kind, name) -> file info written this step
        self._pending_lock = threading.Lock()
        self._fsync_dirs: set[Path] = set()

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path, writable: bool = False, log: Callable[[str], None] = print) -> "Store":
        path = Path(path)
        if not path.is_dir():
            raise SlowllamaError(f"{path}: no such store folder")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise SlowllamaError(f"{path}: not a slowllama store (no {MANIFEST}; run `slowllama prepare` first)")
        from slowllama.config import read_json
        manifest = read_json(manifest_path)
        cls._check_manifest(manifest, path)
        store = cls(path, manifest, writable)
        if writable:
            store.lock = StoreLock(path)
            store.lock.acquire(log)
            store._recover(log)
        return store

    @staticmethod
    def _check_manifest(m: dict, path: Path) -> None:
        where = f"{path / MANIFEST}"
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise SlowllamaError(f"{where}: not a slowllama manifest")
        if m.get("version") != VERSION:
            raise SlowllamaError(f"{where}: store version {m.get('version')!r}, this slowllama reads {VERSION}")
        for field in ("model", "dtype", "files", "step"):
            if field not in m:
                raise SlowllamaError(f"{where}: field {field!r} missing")
        if not isinstance(m["files"], dict):
            raise SlowllamaError(f"{where}: field 'files' must be an object")
        for kind_files in m["files"].values():
            for info in kind_files.values():
                rel = info.get("file", "") if isinstance(info, dict) else ""
                if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
                    raise SlowllamaError(f"{where}: file entry {rel!r} points outside the store")
        try:
            ModelArgs.from_dict(m["model"]).validate(where)
        except TypeError as e:
            raise SlowllamaError(f"{where}: bad model args ({e})") from None
        dtype_from_name(m["dtype"], f"{where}: dtype")

    def _recover(self, log) -> None:
        """Remove what an interrupted step left behind: files the committed manifest does not name."""
        journal = self.path / JOURNAL
        referenced = {info["file"] for kind in self.manifest["files"].values() for info in kind.values()}
        removed = 0
        for kind in KINDS:
            folder = self.path / kind
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f"{kind}/{f.name}" not in referenced:
                    f.unlink()
                    removed += 1
        if journal.exists():
            from slowllama.config import read_json
            try:
                j = read_json(journal)
                cut = j.get("step")
            except SlowllamaError:
                cut = "?"
            if cut == self.step:
                log(f"recovered: step {cut} was committed; finished its clean-up ({removed} old files removed)")
            else:
                log(f"recovered: rolled back the interrupted step {cut}; the store is at step {self.step} "
                    f"({removed} partial files removed)")
            journal.unlink()
            fsync_dir(self.path)
        shutil.rmtree(self.path / "scratch", ignore_errors=True)

    def close(self) -> None:
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
        return ModelArgs.from_dict(self.manifest["model"])

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.manifest["dtype"])

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def scratch(self) -> Path:
        p = self.path / "scratch"
        p.mkdir(exist_ok=True)
        return p

    @property
    def run_dir(self) -> Path:
        p = self.path / "run"
        p.mkdir(exist_ok=True)
        return p

    def has(self, name: str, kind: str = "modules") -> bool:
        with self._pending_lock:
            if (kind, name) in self._pending:
                return True
        return name in self.manifest["files"].get(kind, {})

    def file_info(self, name: str, kind: str = "modules") -> dict:
        with self._pending_lock:
            info = self._pending.get((kind, name))
        if info is None:
            info = self.manifest["files"].get(kind, {}).get(name)
        if info is None:
            raise SlowllamaError(f"{self.path}: the store has no {kind} file for {name!r}")
        return info

    def module_bytes(self, name: str, kind: str = "modules") -> int:
        return int(self.file_info(name, kind)["bytes"])

    # ---- reading and writing -----------------------------------------------------------------
    def read(self, name: str, kind: str = "modules",
             alloc: Optional[Callable[[int], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """The tensors of one module file (CPU, one buffer). Checked against the manifest's size and hash."""
        info = self.file_info(name, kind)
        expect = (int(info["bytes"]), info["xxh3"]) if self.verify else None
        tensors = st.read_file(str(self.path / info["file"]), alloc=alloc, expect=expect, drop_cache=self.drop_cache)
        self.bytes_read += int(info["bytes"])
        return tensors

    def read_slice(self, name: str, key: str, dim: Optional[int] = None, start: int = 0,
                   length: Optional[int] = None, kind: str = "modules") -> torch.Tensor:
        """One tensor of a module file, or a slice of it along `dim`, read by mmap (export's access)."""
        from safetensors import safe_open

        info = self.file_info(name, kind)
        with safe_open(str(self.path / info["file"]), framework="pt") as f:
            if dim is None:
                return f.get_tensor(key)
            sl = f.get_slice(key)
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, start + length)
            return sl[tuple(index)]

    def begin_step(self, step: int) -> None:
        """Mark that step `step` is being written; a crash from here on is rolled back at next open."""
        self._require_writable()
        write_json_atomic(self.path / JOURNAL, {"step": step, "pid": os.getpid(), "time": time.time()})

    def write(self, name: str, tensors: dict[str, torch.Tensor], kind: str = "modules",
              gen: Optional[int] = None) -> dict:
        """Write a module's tensors to a new file of generation `gen` (default: the next step).

        Thread-safe, so a background writer may call it. The file joins the store at commit().
        """
        self._require_writable()
        gen = self.step + 1 if gen is None else gen
        folder = self.path / kind
        folder.mkdir(exist_ok=True)
        rel = f"{kind}/{name}@{gen}.safetensors"
        try:
            size, digest = st.write_file(str(self.path / rel), {k: v.cpu() for k, v in tensors.items()},
                                         drop_cache=self.drop_cache)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full_error(e, str(self.path / rel)) from None
            raise
        info = {"file": rel, "bytes": size, "xxh3": digest}
        with self._pending_lock:
            self._pending[(kind, name)] = info
            self._fsync_dirs.add(folder)
            self.bytes_written += size
        return info

    def commit(self, step: int, updates: Optional[dict] = None) -> None:
        """Make every file written since the last commit part of the store, at step `step`, atomically.

        updates: other manifest fields to set in the same atomic write (run state, for instance).
        """
        self._require_writable()
        with self._pending_lock:
            pending, self._pending = self._pending, {}
            dirs, self._fsync_dirs = self._fsync_dirs, set()
        for d in dirs:
            fsync_dir(d)
        old_files = []
        manifest = json.loads(json.dumps(self.manifest))
        for (kind, name), info in pending.items():
            prev = manifest["files"].setdefault(kind, {}).get(name)
            if prev and prev["file"] != info["file"]:
                old_files.append(prev["file"])
            manifest["files"][kind][name] = info
        manifest["step"] = step
        manifest.update(updates or {})
        try:
            write_json_atomic(self.path / MANIFEST, manifest)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full_error(e, str(self.path / MANIFEST)) from None
            raise
        self.manifest = manifest
        for rel in old_files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / rel).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.path / JOURNAL).unlink()

    def rollback(self) -> None:
        """Drop every file written since the last commit (the step failed before committing)."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for info in pending.values():
            with contextlib.suppress(FileNotFoundError):
                (self.path / info["file"]).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.path / JOURNAL).unlink()

    def update_manifest(self, updates: dict) -> None:
        """Change manifest fields (not the file table) atomically."""
        self._require_writable()
        manifest = {**self.manifest, **updates}
        write_json_atomic(self.path / MANIFEST, manifest)
        self.manifest = manifest

    def _require_writable(self) -> None:
        if not self.writable:
            raise SlowllamaError(f"{self.path}: store opened read-only")

    def evict_from_page_cache(self) -> None:
        """Evict every file the manifest names from the page cache: the next reads come from the disk."""
        for kind_files in self.manifest["files"].values():
            for info in kind_files.values():
                st.evict_file(str(self.path / info["file"]))

    def verify_all(self, progress=None) -> list[str]:
        """Check the size and checksum of every file the manifest names; returns the problems found."""
        problems = []
        entries = [(kind, name) for kind, files in self.manifest["files"].items() for name in files]
        for kind, name in (progress(entries) if progress else entries):
            try:
                self.read(name, kind)
            except SlowllamaError as e:
                problems.append(str(e))
        return problems


class StoreBuilder:
    """A new store, built in a hidden temporary folder and renamed into place only when complete."""

    def __init__(self, path, force: bool = False):
        self.path = Path(path)
        if self.path.exists() and not force:
            raise SlowllamaError(f"{self.path}: already exists (use --force to replace it)")
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        (self.tmp / "modules").mkdir(parents=True)
        self.files: dict[str, dict] = {"modules": {}}

    def module_writer(self, name: str, specs: dict) -> st.SliceWriter:
        return st.SliceWriter(str(self.tmp / "modules" / f"{name}@0.safetensors"), specs)

    def finish_module(self, name: str, writer: st.SliceWriter) -> None:
        size, digest = writer.finish()
        self.files["modules"][name] = {"file": f"modules/{name}@0.safetensors", "bytes": size, "xxh3": digest}

    def write_module(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        rel = f"modules/{name}@0.safetensors"
        size, digest = st.write_file(str(self.tmp / rel), tensors)
        self.files["modules"][name] = {"file": rel, "bytes": size, "xxh3": digest}

    def copy_file(self, src: Path, name: str) -> None:
        shutil.copyfile(src, self.tmp / name)

    def finish(self, manifest: dict) -> Path:
        manifest = {"format": FORMAT, "version": VERSION, **manifest, "files": self.files, "step": 0}
        write_json_atomic(self.tmp / MANIFEST, manifest)
        if self.path.exists():  # --force: the old store goes only once the new one is complete
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def spec_of(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def element_size(dtype: torch.dtype) -> int:
    return st.element_size(dtype)
