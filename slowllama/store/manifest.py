"""A store's manifest.json as typed records, checked once when the store opens.

Written back with the same keys and nesting as it was read (in the same order, fields this version
does not know kept as they are), so a store written before a change of slowllama opens after it,
and the other way round.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.jsonfile import read_json
from slowllama.model.args import ModelArgs, dtype_from_name, dtype_name
from slowllama.store.quantized import FIELD as QUANTIZATION, Quantization
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS

FORMAT = "slowllama-store"
VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal.json"  # a store's record of the step being written (store.py)
KINDS = ("modules", "optim", "master")  # weights, optimizer state, fp32 master weights
STATE_KINDS = ("optim", "master")  # kept in parts (state_parts.py)
# the top-level fields this version reads, in the order a new store writes them
FIELDS = ("format", "version", "state_part_elements", "model", "dtype", "source", "files", "step", "run")
# the top-level field that names the files copied from the source verbatim (tokenizer files, config.json ...)
# with their sizes and xxh3-128 checksums, so that every open checks them like module files
COPIED = "copied_files"
# the fields of a source record that every converter writes; the others are the converter's own
COMMON_SOURCE_FIELDS = ("format", "tokenizer_files", "files")


@dataclass(frozen=True)
class FileEntry:
    """One file of the store: its path inside the store, size and xxh3-128 checksum.

    A module's entry also lists the row patches that reads apply on top of its file, in order.
    A module file written weight by weight (a block streamed by weight) has a checksum per tensor
    instead of one for the file (`xxh3` empty): each weight is checked as it is read on its own.
    """

    file: str
    bytes: int
    xxh3: str
    rows: tuple[FileEntry, ...] = ()
    tensors: Optional[dict[str, str]] = None  # tensor name -> xxh3-128 of its bytes (also known: see Store)

    def files(self) -> list[str]:
        """The entry's files: its module file, then its row patches in the order they apply."""
        return [self.file] + [patch.file for patch in self.rows]

    @classmethod
    def from_json(cls, entry: dict) -> FileEntry:
        patches = tuple(cls(p["file"], p["bytes"], p["xxh3"]) for p in entry.get("rows", []))
        return cls(entry["file"], entry["bytes"], entry["xxh3"], patches, entry.get("tensors"))

    def to_json(self) -> dict:
        out = {"file": self.file, "bytes": self.bytes, "xxh3": self.xxh3}
        if self.tensors:
            out["tensors"] = dict(self.tensors)
        if self.rows:
            out["rows"] = [patch.to_json() for patch in self.rows]
        return out


@dataclass(frozen=True)
class RunRecord:
    """The training run a store is in, committed with each of its steps.

    start_step: the store's step when the run began (its steps done: store step - start_step);
    settings: those that define the run (run_settings), so that a resume reports what changed;
    grad_norm: the gradient norm of its last committed step (--clip-norm previous clips with it).
    """

    start_step: int
    settings: dict
    grad_norm: Optional[float] = None  # None: not recorded yet

    @classmethod
    def from_json(cls, run: dict) -> RunRecord:
        return cls(run["start_step"], run["settings"], run.get("grad_norm"))

    def to_json(self) -> dict:
        out = {"start_step": self.start_step, "settings": self.settings}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        return out


@dataclass(frozen=True)
class SourceRecord:
    """What prepare recorded of the checkpoint a store was made from, so that export can rebuild it.

    Kept as prepare wrote it: the store never changes it, and checks nothing in it when it opens. The
    fields every converter writes are read here; the rest is the converter's own layout (shards, keys,
    dtypes, cuts, config.json), which that converter parses and checks, naming a hand-edited field.
    """

    value: Any  # the manifest's "source": an object, unless edited by hand

    @property
    def is_object(self) -> bool:
        """False for a record edited into something other than an object (an empty one reads as no record)."""
        return isinstance(self.value, dict) or not self.value

    @property
    def _fields(self) -> dict:
        return self.value if isinstance(self.value, dict) else {}

    @property
    def format(self):
        """The format prepare read ("meta", "hf", "synthetic"); Meta's where none is recorded (the first stores)."""
        return self._fields.get("format", "meta")

    @property
    def tokenizer_files(self):
        """The tokenizer files prepare copied into the store, as recorded; None when not recorded."""
        return self._fields.get("tokenizer_files")

    @property
    def files(self):
        """The source's other files copied into the store as they are (config.json ...); None when not recorded."""
        return self._fields.get("files")

    @property
    def layout(self) -> dict:
        """The converter's own fields, as recorded (unchecked: the converter checks what it reads)."""
        return {k: v for k, v in self._fields.items() if k not in COMMON_SOURCE_FIELDS}


@dataclass(frozen=True)
class Manifest:
    """The manifest of a store: the model, the store's dtype and step, its file table, the source, the run."""

    model: dict  # ModelArgs' fields, as written (ModelArgs.from_dict reads them)
    dtype: str  # of the module files: "fp32", "bf16" or "fp16"
    step: int
    files: dict[str, dict[str, FileEntry]]  # kind (KINDS) -> module or state part name -> entry
    source: Optional[SourceRecord] = None  # None: not recorded
    run: Optional[RunRecord] = None  # None: no run committed a step yet
    state_part_elements: Optional[int] = None  # None: not recorded (stores before parts: DEFAULT_PART_ELEMENTS)
    extra: dict = field(default_factory=dict)  # top-level fields this version does not know, kept as they are
    json_order: tuple[str, ...] = ()  # the top-level keys in the order of the file read (kept when written)

    @classmethod
    def new(cls, args: ModelArgs, dtype: torch.dtype, source: dict) -> Manifest:
        """The manifest of a new store; StoreBuilder.finish gives it its files and step 0."""
        return cls(model=args.to_dict(), dtype=dtype_name(dtype), step=0, files={}, source=SourceRecord(source))

    @classmethod
    def read(cls, store_path: Path) -> Manifest:
        """The manifest of the store at store_path, checked (SlowllamaError naming the field that is wrong)."""
        return cls.read_file(Path(store_path) / MANIFEST)

    @classmethod
    def read_file(cls, path: Path) -> Manifest:
        """A manifest in a file of another name (a share's prepared manifest), checked."""
        return cls.from_json(read_json(path), str(path))

    @classmethod
    def from_json(cls, m, where: str) -> Manifest:
        """The manifest of a JSON object, checked first: `where` names the file in the messages."""
        check_manifest(m, where)
        run, source = m.get("run"), m.get("source")
        return cls(model=m["model"], dtype=m["dtype"], step=m["step"],
                   files={kind: {name: FileEntry.from_json(info) for name, info in entries.items()}
                          for kind, entries in m["files"].items()},
                   source=None if source is None else SourceRecord(source),
                   run=None if run is None else RunRecord.from_json(run),
                   state_part_elements=m.get("state_part_elements"),
                   extra={k: v for k, v in m.items() if k not in FIELDS}, json_order=tuple(m))

    def to_json(self) -> dict:
        """The JSON object: the fields as read in their order (a null stays null), then new ones (the run)."""
        values = {"format": FORMAT, "version": VERSION, "state_part_elements": self.state_part_elements,
                  "model": self.model, "dtype": self.dtype,
                  "source": None if self.source is None else self.source.value, **self.extra,
                  "files": {kind: {name: entry.to_json() for name, entry in entries.items()}
                            for kind, entries in self.files.items()},
                  "step": self.step, "run": None if self.run is None else self.run.to_json()}
        keys = [k for k in self.json_order if k in values]
        keys += [k for k, v in values.items() if k not in self.json_order and v is not None]
        return {k: values[k] for k in keys}

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.model)

    @property
    def quantization(self) -> Optional[Quantization]:
        """How the blocks' linear weights are stored (store/quantized.py); None: in the store's dtype."""
        q = self.extra.get(QUANTIZATION)
        return None if q is None else Quantization.from_json(q, MANIFEST)

    def entries(self) -> list[tuple[str, str]]:
        """(kind, name) of every entry of the file table."""
        return [(kind, name) for kind, entries in self.files.items() for name in entries]

    def named_files(self) -> set[str]:
        """Every file the manifest names (paths relative to the store)."""
        return {f for entries in self.files.values() for entry in entries.values() for f in entry.files()}


def check_manifest(m, where: str) -> None:
    """Refuse a manifest that is not one this version reads, naming the field (a store edited by hand)."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SlowllamaError(f"{where}: not a slowllama manifest")
    if m.get("version") != VERSION:
        raise SlowllamaError(f"{where}: store version {m.get('version')!r}, this slowllama reads {VERSION}")
    for name in ("model", "dtype", "files", "step"):
        if name not in m:
            raise SlowllamaError(f"{where}: field {name!r} missing")
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
                digests = entry.get("tensors")
                if (digests is not None and not (isinstance(digests, dict) and digests and all(
                        isinstance(k, str) and isinstance(v, str) for k, v in digests.items()))) \
                        or (not digest and digests is None):
                    raise SlowllamaError(f"{where}: the entry of {kind} {name!r} needs a checksum: 'xxh3', or "
                                         "'tensors' (an object of tensor names to checksums)")
    copied = m.get(COPIED, {})
    if not isinstance(copied, dict):
        raise SlowllamaError(f"{where}: field {COPIED!r} must be an object of file entries")
    for name, entry in copied.items():
        if not name or Path(name).name != name or name in (".", "..") or "\0" in name:
            raise SlowllamaError(f"{where}: {COPIED} entry {name!r} is not a file of the store's folder")
        size, digest = entry.get("bytes") if isinstance(entry, dict) else None, \
            entry.get("xxh3") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str):
            raise SlowllamaError(f"{where}: the {COPIED} entry of {name!r} needs 'bytes' (an integer) and "
                                 "'xxh3' (a string)")
    cap = m.get("state_part_elements", DEFAULT_PART_ELEMENTS)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise SlowllamaError(f"{where}: field 'state_part_elements' must be a positive integer, got {cap!r}")
    run = m.get("run")
    if run is not None and not (isinstance(run, dict) and isinstance(run.get("start_step"), int)
                                and isinstance(run.get("settings"), dict)
                                and isinstance(run.get("grad_norm", 0.0), (int, float))):
        raise SlowllamaError(f"{where}: field 'run' must be an object with 'start_step' and 'settings'")
    if run is not None:
        norm, start = run.get("grad_norm", 0.0), run["start_step"]
        if isinstance(norm, bool) or not math.isfinite(norm) or norm < 0:
            raise SlowllamaError(f"{where}: field 'run.grad_norm' must be a finite number >= 0, got {norm!r}")
        if isinstance(start, bool) or not 0 <= start <= m["step"]:
            raise SlowllamaError(f"{where}: field 'run.start_step' must be in [0, step], got {start!r}")
    if not isinstance(m["model"], dict):
        raise SlowllamaError(f"{where}: field 'model' must be an object")
    try:
        ModelArgs.from_dict(m["model"]).validate(where)
    except TypeError as e:
        raise SlowllamaError(f"{where}: bad model args ({e})") from None
    dtype_from_name(m["dtype"], f"{where}: dtype")
    if m.get(QUANTIZATION) is not None:
        Quantization.from_json(m[QUANTIZATION], where)
