"""The on-disk store: one safetensors file per module, a JSON manifest, atomic commits, one writer.

Layout of a store folder:
    manifest.json                 model args, store dtype, source layout, file table, step, run state
    tokenizer.model (or the source's tokenizer files: tokenizer.json, tokenizer_config.json, ...)
    config.json, generation_config.json, model.safetensors.index.json   (a Hugging Face source's, verbatim)
    modules/<name>@<gen>.safetensors  weights of tok_embeddings, layers.N, head (and extras)
    modules/<name>@<gen>.rows.safetensors  a row patch: ids and new values of the rows step <gen> changed
    optim/<name>#<i>@<gen>.safetensors  optimizer state of a module, part i: rows of one weight (AdamW moments, step)
    master/<name>#<i>@<gen>.safetensors fp32 master weights of a 16-bit store, in the same parts (optional)
    journal.json                  present while a step is being written
    scratch/                      spilled activations of the running step
    run/                          logs of training runs: settings, metrics.jsonl
    lock                          pid of the process that writes the store

A step writes every updated module to a new file (a new <gen>), or only its changed rows to a
row patch that reads apply on top of the module's file (the manifest lists them in order), then
commits by replacing the manifest atomically (write, fsync, rename, fsync the folder) once every
file is fsynced; only then are the files the new manifest no longer names removed. Files the
manifest does not name are garbage of an interrupted step, removed when the store is next opened
for writing. So the store is always entirely at one step.
Only this module touches module files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from slowllama.model.args import ModelArgs, dtype_from_name
from slowllama.errors import SlowllamaError
from slowllama.faults import fault_point
from slowllama.model.shapes import module_names, module_shapes
from slowllama.store import safetensors_io as st
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS, StatePart, state_parts

FORMAT = "slowllama-store"
VERSION = 1
KINDS = ("modules", "optim", "master")  # weights, optimizer state, fp32 master weights
STATE_KINDS = ("optim", "master")  # kept in parts (state_parts.py)
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
# paths a writer creates or writes through: none may be a symbolic link (it would lead the writes outside)
OWN_PATHS = (MANIFEST, JOURNAL, "lock", *KINDS, "scratch", "run", "run/settings.json", "run/metrics.jsonl")


def entry_files(info: dict) -> list[str]:
    """The files of one manifest entry: its module file, then its row patches in the order they apply."""
    return [info["file"]] + [patch["file"] for patch in info.get("rows", [])]


def named_files(manifest: dict) -> set[str]:
    """Every file a manifest names (paths relative to the store)."""
    return {f for kind in manifest["files"].values() for info in kind.values() for f in entry_files(info)}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj, fault: str = "") -> None:
    """Write JSON to path by tmp file + fsync + rename + fsync of the folder: all or nothing.

    fault: prefix of the fault points just before and after the rename (crash tests).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(f"{fault}.before_rename")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    if fault:
        fault_point(f"{fault}.after_rename")
    fsync_dir(path.parent)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM until the block is done (a commit is never cut in half by a Ctrl-C).

    Python runs signal handlers in the main thread between bytecodes, whichever thread the signal
    reached: swapping the handlers for a recorder holds them all.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in got:
            if callable(old[signum]):
                old[signum](signum, None)
            elif old[signum] == signal.SIG_DFL:
                signal.raise_signal(signum)


def check_free_space(folder: Path, needed: int, what: str, detail: str = "") -> None:
    """Refuse before writing anything when the disk holding folder has less than `needed` bytes free."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SlowllamaError(f"{what}: not enough free disk at {probe}: needs {needed / 2**30:.2f} GiB"
                             f"{f' ({detail})' if detail else ''}, {free / 2**30:.2f} GiB free")


def check_output_folder(out: Path, force: bool, inputs: tuple = ()) -> None:
    """Refuse an output folder that exists (without --force), is not a folder, or overlaps an input folder."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise SlowllamaError(f"{out}: already exists (use --force to replace it)")
        if out.is_symlink() or not out.is_dir():
            raise SlowllamaError(f"{out}: not a folder (--force replaces only a folder)")
    real = Path(os.path.realpath(out))
    for src in inputs:
        src_real = Path(os.path.realpath(src))
        if real == src_real or src_real in real.parents or real in src_real.parents:
            raise SlowllamaError(f"{out}: overlaps {src}, which it is made from (choose another folder)")


@contextlib.contextmanager
def staged_folder(out: Path):
    """A folder to write `out` into: hidden beside it, put in place only once complete and durable
    (every file fsynced, then renamed over any old `out`), removed if the writing fails."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in tmp.iterdir():
            st.fsync_file(str(p))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_full_error(e: OSError, what: str) -> SlowllamaError:
    return SlowllamaError(f"{what}: disk full ({e.strerror}); the store stays at its last committed step")


class StoreLock:
    """One writer per store: an exclusive flock on STORE/lock, with the owner's pid in it for messages."""

    def __init__(self, folder: Path):
        self.path = folder / "lock"
        self.fd: Optional[int] = None

    def acquire(self, log: Callable[[str], None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise SlowllamaError(f"{self.path}: cannot open the lock file ({e.strerror})") from None
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

    def refuse_if_written(self) -> None:
        """Readers: refuse a store that another process is writing (its files change at every step)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file: nobody ever wrote this store
        try:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if pid == str(os.getpid()):
                return  # this process writes it (eval and generation inside finetune)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlowllamaError(f"{self.path.parent}: a finetune (pid {pid or '?'}) is writing this store; "
                                 "read it when that run has stopped") from None
        except OSError:
            return  # not a lock file a writer could hold (verify reports a lock that is not a file)
        finally:
            os.close(fd)


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
        self._written: set[str] = set()  # files written since the last commit (a rollback removes them)
        self._pending_lock = threading.Lock()
        self._fsync_dirs: set[Path] = set()
        # fsyncs of written files run here, so that the disk flushes one file while the writer fills the
        # page cache with the next; commit() waits for them all before the manifest's rename
        self._syncer: Optional[ThreadPoolExecutor] = None
        self._syncing: list[tuple[str, Future]] = []

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path, writable: bool = False, log: Callable[[str], None] = print,
             follower: bool = False) -> "Store":
        """Open a store; writable: lock it (one writer) and clean up after an interrupted step.

        A read-only open refuses a store that a finetune is writing (its files change at every step),
        unless it is a `follower`: a rank > 0 of that finetune, which reads only the manifest.
        """
        path = Path(path)
        if not path.is_dir():
            raise SlowllamaError(f"{path}: no such store folder")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise SlowllamaError(f"{path}: not a slowllama store (no {MANIFEST}; run `slowllama prepare` first)")
        from slowllama.jsonfile import read_json
        manifest = read_json(manifest_path)
        cls._check_manifest(manifest, path)
        store = cls(path, manifest, writable)
        if writable:
            store._refuse_symlinks()
            store.lock = StoreLock(path)
            store.lock.acquire(log)
            store._recover(log)
            store._split_whole_state(log)
        elif not follower:
            StoreLock(path).refuse_if_written()
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
        if not isinstance(m["step"], int) or isinstance(m["step"], bool) or m["step"] < 0:
            raise SlowllamaError(f"{where}: field 'step' must be a non-negative integer, got {m['step']!r}")
        if not isinstance(m["files"], dict) or not all(isinstance(f, dict) for f in m["files"].values()):
            raise SlowllamaError(f"{where}: field 'files' must be an object of objects")
        for kind, kind_files in m["files"].items():
            for name, info in kind_files.items():
                rows = info.get("rows", []) if isinstance(info, dict) else []
                if not isinstance(rows, list):
                    raise SlowllamaError(f"{where}: 'rows' of {kind} {name!r} must be a list of file entries")
                for entry in [info, *rows]:
                    rel = entry.get("file", "") if isinstance(entry, dict) else ""
                    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts \
                            or "\0" in rel:
                        raise SlowllamaError(f"{where}: file entry {rel!r} points outside the store")
                    size, digest = entry.get("bytes"), entry.get("xxh3")
                    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str):
                        raise SlowllamaError(f"{where}: the entry of {kind} {name!r} needs 'bytes' (an integer) "
                                             "and 'xxh3' (a string)")
        cap = m.get("state_part_elements", DEFAULT_PART_ELEMENTS)
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise SlowllamaError(f"{where}: field 'state_part_elements' must be a positive integer, got {cap!r}")
        run = m.get("run")
        if run is not None and not (isinstance(run, dict) and isinstance(run.get("start_step"), int)
                                    and isinstance(run.get("settings"), dict)
                                    and isinstance(run.get("grad_norm", 0.0), (int, float))):
            raise SlowllamaError(f"{where}: field 'run' must be an object with 'start_step' and 'settings'")
        if not isinstance(m["model"], dict):
            raise SlowllamaError(f"{where}: field 'model' must be an object")
        try:
            ModelArgs.from_dict(m["model"]).validate(where)
        except TypeError as e:
            raise SlowllamaError(f"{where}: bad model args ({e})") from None
        dtype_from_name(m["dtype"], f"{where}: dtype")

    def _refuse_symlinks(self) -> None:
        """A writer writes and deletes files in these places: each must be the store's own, not a link."""
        for rel in OWN_PATHS:
            if (self.path / rel).is_symlink():
                raise SlowllamaError(f"{self.path / rel}: a symbolic link; a store's own files and folders "
                                     "must lie inside it (remove the link)")

    def _recover(self, log) -> None:
        """Remove what an interrupted step left behind: files the committed manifest does not name."""
        journal = self.path / JOURNAL
        referenced = named_files(self.manifest)
        removed = 0
        for kind in KINDS:
            folder = self.path / kind
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f"{kind}/{f.name}" not in referenced and not f.is_dir():  # a link is removed, not followed
                    f.unlink()
                    removed += 1
        for tmp in (MANIFEST, JOURNAL):  # a rename that never happened
            with contextlib.suppress(FileNotFoundError):
                (self.path / f"{tmp}.tmp").unlink()
        if journal.exists():
            from slowllama.jsonfile import read_json
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
        whole = [(kind, name) for kind in STATE_KINDS for name in self.manifest["files"].get(kind, {})
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

    @property
    def state_part_elements(self) -> int:
        return int(self.manifest.get("state_part_elements", DEFAULT_PART_ELEMENTS))

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
        return int(self.file_info(name, kind)["bytes"])

    # ---- reading and writing -----------------------------------------------------------------
    def file_path(self, info: dict) -> Path:
        """The path of a manifest entry, refused unless it is a plain file inside the store (no links)."""
        path = self.path / info["file"]
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
        info = self.file_info(name, kind)
        tensors, path = self._read_entry(info, alloc)
        self._check_shapes(name, kind, tensors, path)
        for patch in info.get("rows", []):
            self._apply_rows(tensors, patch)
        return tensors

    def _read_entry(self, info: dict, alloc=None) -> tuple[dict[str, torch.Tensor], Path]:
        expect = (int(info["bytes"]), info["xxh3"]) if self.verify else None
        path = self.file_path(info)
        tensors = st.read_file(str(path), alloc=alloc, expect=expect, drop_cache=self.drop_cache)
        self.bytes_read += int(info["bytes"])
        return tensors, path

    def read_state(self, name: str, kind: str = "optim") -> dict[str, torch.Tensor]:
        """A module's whole optimizer state (or master weights), its parts joined (AdamW's step: the first part's)."""
        pieces: dict[str, list[torch.Tensor]] = {}
        for part in self.state_parts(name):
            for key, t in self.read(part.name, kind).items():
                if key != "step" or key not in pieces:
                    pieces.setdefault(key, []).append(t)
        return {k: p[0] if len(p) == 1 else torch.cat(p) for k, p in pieces.items()}

    def _apply_rows(self, tensors: dict[str, torch.Tensor], patch: dict) -> None:
        """Apply a row patch (written by write_rows) to a module's tensors, checked like any file."""
        rows, path = self._read_entry(patch)
        for key in [k[:-len(".ids")] for k in rows if k.endswith(".ids")]:
            ids, values = rows[f"{key}.ids"], rows.get(f"{key}.rows")
            target = tensors.get(key)
            if (target is None or values is None or ids.dtype != torch.int64 or ids.dim() != 1
                    or values.dtype != target.dtype or tuple(values.shape) != (len(ids), *target.shape[1:])
                    or (len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < target.shape[0])):
                raise SlowllamaError(f"{path}: the rows of {key!r} do not fit the module (altered outside slowllama)")
            target[ids] = values

    def _check_shapes(self, name: str, kind: str, tensors: dict, path: Path) -> None:
        """Refuse a file whose tensors are not the module's (a store edited outside slowllama)."""
        part = self._part_by_name.get(name) if kind in STATE_KINDS else None
        if part is not None:
            expected = {part.key: part.shape}
        elif name in self.expected_shapes and kind in KINDS:
            expected = self.expected_shapes[name]  # a module (or, before parts, a module's whole state)
        else:
            return  # extras: the source's own keys
        for key, t in tensors.items():
            weight = key if kind != "optim" else key.rsplit(".", 1)[0]
            if kind == "optim" and key == "step":
                continue
            if weight not in expected or tuple(t.shape) != expected[weight]:
                raise SlowllamaError(f"{path}: tensor {key!r} {list(t.shape)} is not a weight of {name} "
                                     "(the file does not fit the model)")
            want = self.dtype if kind == "modules" else torch.float32 if kind == "master" else t.dtype
            if t.dtype != want:
                raise SlowllamaError(f"{path}: tensor {key!r} is {t.dtype}, the store holds {want}")
        if kind != "optim" and set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))
            raise SlowllamaError(f"{path}: tensor {missing[0]!r} missing")

    @functools.cached_property
    def expected_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{module name: {weight name: shape}} of the model the manifest describes."""
        return {name: module_shapes(self.args, name) for name in module_names(self.args)}

    def read_slice(self, name: str, key: str, dim: Optional[int] = None, start: int = 0,
                   length: Optional[int] = None, kind: str = "modules") -> torch.Tensor:
        """One tensor of a module file, or a slice of it along `dim`, read by mmap (export's access)."""
        from safetensors import safe_open

        info = self.file_info(name, kind)
        if info.get("rows"):  # patched rows: the whole tensor, as read() makes it
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
              gen: Optional[int] = None) -> dict:
        """Write a module's tensors to a new file of generation `gen` (default: the next step).

        Thread-safe, so a background writer may call it. The file joins the store at commit().
        """
        gen = self.step + 1 if gen is None else gen
        info = self._write_file(f"{kind}/{name}@{gen}.safetensors", tensors)
        with self._pending_lock:
            self._pending[(kind, name)] = info
        return info

    def rows_worth_writing(self, name: str, nbytes: int, kind: str = "modules") -> bool:
        """Whether a row patch of nbytes beats rewriting the module: patches stay under a quarter of its size
        (past that, the next write is the whole module, and the patches go)."""
        info = self.file_info(name, kind)
        return sum(p["bytes"] for p in info.get("rows", [])) + nbytes <= int(info["bytes"]) // 4

    def write_rows(self, name: str, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], kind: str = "modules",
                   gen: Optional[int] = None) -> dict:
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
            base = self._pending.get((kind, name)) or self.manifest["files"][kind][name]
            info = {**base, "rows": [*base.get("rows", []), patch]}
            self._pending[(kind, name)] = info
        return info

    def _write_file(self, rel: str, tensors: dict[str, torch.Tensor]) -> dict:
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
        return {"file": rel, "bytes": size, "xxh3": digest}

    def commit(self, step: int, updates: Optional[dict] = None, remove: tuple = ()) -> None:
        """Make every file written since the last commit part of the store, at step `step`, atomically.

        updates: other manifest fields to set in the same atomic write (run state, for instance);
        remove: (kind, name) entries that leave the store, their files deleted once committed.
        """
        self._require_writable()
        self.sync()
        with self._pending_lock:
            pending = dict(self._pending)  # they stay pending (rollback removes them) until the rename
            dirs, self._fsync_dirs = self._fsync_dirs, set()
        for d in dirs:
            fsync_dir(d)
        old_files = []
        manifest = json.loads(json.dumps(self.manifest))
        for (kind, name), info in pending.items():
            prev = manifest["files"].setdefault(kind, {}).get(name)
            if prev:
                old_files += [f for f in entry_files(prev) if f not in entry_files(info)]
            manifest["files"][kind][name] = info
        for kind, name in remove:
            old_files += entry_files(manifest["files"][kind].pop(name))
        manifest["step"] = step
        manifest.update(updates or {})
        with signals_deferred():  # a second Ctrl-C lands before or after the commit, never inside it
            try:
                write_json_atomic(self.path / MANIFEST, manifest, fault="store.commit")
            except OSError as e:
                if self._step_on_disk() != step:  # the rename did not happen: nothing was committed
                    if e.errno == errno.ENOSPC:
                        raise disk_full_error(e, str(self.path / MANIFEST)) from None
                    raise
                self._committed(manifest, pending)  # renamed, but the folder's fsync failed
                raise
            self._committed(manifest, pending)
            for rel in old_files:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / rel).unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.path / JOURNAL).unlink()

    def _committed(self, manifest: dict, pending: dict) -> None:
        self.manifest = manifest
        with self._pending_lock:
            for key, info in pending.items():
                self._pending.pop(key, None)
                self._written.difference_update(entry_files(info))

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
        for rel in written:
            with contextlib.suppress(FileNotFoundError):
                (self.path / rel).unlink()
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

    def check_step_space(self, optim_bytes_per_weight: int, master_bytes_per_weight: int, spill_bytes: int) -> None:
        """Refuse to start training when one step's new files would not fit on the store's disk.

        A step writes new module files (and optimizer state, master weights) beside the committed
        ones, which go only once it commits; activations beyond the memory budget go to scratch/.
        """
        from slowllama.sizes import format_size

        modules = sum(int(info["bytes"]) for name, info in self.manifest["files"]["modules"].items()
                      if name in self.expected_shapes)
        weights = modules // element_size(self.dtype)
        parts = {"new module files": modules, "optimizer state": weights * optim_bytes_per_weight,
                 "master weights": weights * master_bytes_per_weight, "spilled activations": spill_bytes}
        detail = ", ".join(f"{what} {format_size(n)}" for what, n in parts.items() if n)
        check_free_space(self.path, sum(parts.values()) + (1 << 20), "a training step", detail)

    def evict_from_page_cache(self) -> None:
        """Evict every file the manifest names from the page cache: the next reads come from the disk."""
        for rel in named_files(self.manifest):
            st.evict_file(str(self.path / rel))

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

    def link_module(self, name: str, store: "Store", kind: str = "modules") -> None:
        """Take a module file of another store unchanged (a hard link where possible, else a copy)."""
        info = store.file_info(name, kind)
        dest = self.tmp / kind / Path(info["file"]).name
        dest.parent.mkdir(exist_ok=True)
        if info.get("rows"):  # row patches: one file with them applied
            size, digest = st.write_file(str(dest), store.read(name, kind))
            self.files.setdefault(kind, {})[name] = {"file": f"{kind}/{dest.name}", "bytes": size, "xxh3": digest}
            return
        try:
            os.link(store.path / info["file"], dest)
        except OSError:
            shutil.copyfile(store.path / info["file"], dest)
        self.files.setdefault(kind, {})[name] = {**info, "file": f"{kind}/{dest.name}"}

    def copy_file(self, src: Path, name: str) -> None:
        shutil.copyfile(src, self.tmp / name)

    def finish(self, manifest: dict) -> Path:
        manifest = {"format": FORMAT, "version": VERSION, "state_part_elements": DEFAULT_PART_ELEMENTS, **manifest,
                    "files": self.files, "step": 0}
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


def part_tensors(tensors: dict[str, torch.Tensor], part: StatePart, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of one part, cut from a module's whole optimizer state or master weights."""
    if kind == "master":
        return {part.key: tensors[part.key][part.rows]}
    return {"step": tensors["step"], **{f"{part.key}.{m}": tensors[f"{part.key}.{m}"][part.rows]
                                        for m in ("exp_avg", "exp_avg_sq")}}


def spec_of(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def element_size(dtype: torch.dtype) -> int:
    return st.element_size(dtype)
