"""The safetensors file layout, read and written without extra copies.

A safetensors file is: 8 bytes (little-endian u64) header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, padded with
spaces to a multiple of 8), then the raw tensor bytes. We write the format ourselves so that a
module is read straight into one (optionally pinned) buffer, hashed on the way in and out, and so
that prepare can place each checkpoint slice into its spot in a preallocated file. The files are
ordinary safetensors files: the `safetensors` library reads them (a test checks it).
store.py calls this module for module files; hf_checkpoint.py for the layout of Hugging Face shards
(read_layout) and to write them tensor by tensor (write_streamed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch
import xxhash

from slowllama.errors import SlowllamaError
from slowllama.store.safe_files import check_regular, create_file, open_new

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 << 20  # a header larger than this is not a module file of ours
# bytes per element of every dtype the safetensors library knows (HF shards may hold any of them)
ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}

Hasher = xxhash.xxh3_128
READ_CHUNK = 32 << 20  # checked reads go by chunks of this size, each hashed while the next is read
# the thread that hashes what checked reads have read (one, so that a file's chunks are hashed in order;
# it starts on first use)
HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowllama-hash")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Optional[dict] = None):
    """The header bytes and each tensor's (begin, end) offset inside the data section, in spec order."""
    header, offsets, pos = {}, {}, 0
    if metadata:  # first, as the safetensors library writes it (so our HF shards match its bytes)
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, (dtype, shape) in specs.items():
        nbytes = element_size(dtype) * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[key] = (pos, pos + nbytes)
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets, pos


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def drop_from_page_cache(fd: int) -> None:
    """Evict an open file's clean pages from the page cache (posix_fadvise DONTNEED; a no-op where missing)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def evict_file(path: str) -> None:
    """Evict a file from the page cache, so that its next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_from_page_cache(fd)
    finally:
        os.close(fd)


def write_file(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None,
               fsync: bool = True, drop_cache: bool = False) -> tuple[int, str]:
    """Write tensors (CPU) as a safetensors file; returns (size, xxh3-128 hex) of the whole file.

    drop_cache evicts the file from the page cache once it is fsynced (only clean pages can go).
    """
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    head, _, data_len = layout(specs, metadata)
    h = Hasher()
    h.update(head)
    with open_new(path) as f:  # a new file: never through a link planted at the name
        f.write(head)
        for t in tensors.values():
            mv = tensor_bytes(t)
            h.update(mv)
            f.write(mv)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        if drop_cache:
            drop_from_page_cache(f.fileno())
    return len(head) + data_len, h.hexdigest()


def fsync_file(path: str, drop_cache: bool = False) -> None:
    """Make a written file durable (and, with drop_cache, evict it from the page cache afterwards)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop_cache:
            drop_from_page_cache(fd)
    finally:
        os.close(fd)


def read_header(f, path: str, metadata: Optional[dict] = None) -> tuple[dict, int]:
    """Parse the header of an open file; returns (header without metadata, start of the data section).

    metadata: a dict that receives the file's __metadata__ entries, if the caller wants them.
    """
    raw = f.read(8)
    if len(raw) < 8:
        raise SlowllamaError(f"{path}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise SlowllamaError(f"{path}: not a safetensors file (header length {n})")
    text = f.read(n)
    if len(text) < n:
        raise SlowllamaError(f"{path}: truncated (header cut short)")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise SlowllamaError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise SlowllamaError(f"{path}: not a safetensors file (bad header)")
    found = header.pop("__metadata__", None)
    if found is not None and not (isinstance(found, dict) and all(isinstance(v, str) for v in found.values())):
        raise SlowllamaError(f"{path}: not a safetensors file (__metadata__ must map names to strings)")
    if metadata is not None and isinstance(found, dict):
        metadata.update(found)
    check_header(header, os.fstat(f.fileno()).st_size - 8 - n, path)
    return header, 8 + n


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key given twice")
    return dict(pairs)


def _naturals(value, count=None) -> bool:
    return (isinstance(value, list) and (count is None or len(value) == count)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def check_header(header: dict, data_len: int, path) -> None:
    """Refuse a header the safetensors library would refuse: every entry a known dtype, a shape of
    naturals and offsets in bounds whose span is dtype x shape bytes, the spans contiguous from 0 to the
    end of the file (no overlap, no gap, nothing after)."""
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or not _naturals(info.get("shape")) \
                or not _naturals(info.get("data_offsets"), 2) or not isinstance(info.get("dtype"), str):
            raise SlowllamaError(f"{path}: bad header entry for {key!r}")
        if info["dtype"] not in ST_SIZES:
            raise SlowllamaError(f"{path}: tensor {key!r} has an unknown dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        if not begin <= end <= data_len:
            raise SlowllamaError(f"{path}: tensor {key!r} lies outside the file (truncated or altered)")
        need = ST_SIZES[info["dtype"]] * math.prod(info["shape"])
        if need != end - begin:
            raise SlowllamaError(f"{path}: tensor {key!r} lies outside the file (its dtype and shape need {need} "
                                 f"bytes, its offsets span {end - begin})")
        spans.append((begin, end, key))
    pos, before = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise SlowllamaError(f"{path}: tensors {before!r} and {key!r} overlap (altered)")
        if begin > pos:
            raise SlowllamaError(f"{path}: {begin - pos} bytes of no tensor before {key!r} (altered)")
        pos, before = end, key
    if pos != data_len:
        raise SlowllamaError(f"{path}: {data_len - pos} bytes after the last tensor (altered)")


def _open_module_file(path: str):
    """An unbuffered reader of a file the store names, or one line saying why not."""
    if os.path.lexists(path):
        check_regular(path)  # a FIFO would block the read, a device never end
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise SlowllamaError(f"{path}: module file missing") from None
    except OSError as e:
        raise SlowllamaError(f"{path}: cannot read ({e.strerror})") from None


def read_file(path: str, alloc: Optional[Callable[[int], torch.Tensor]] = None,
              expect: Optional[tuple] = None, drop_cache: bool = False) -> dict[str, torch.Tensor]:
    """Read a whole file into one uint8 buffer and return typed views of it, in header order.

    alloc(nbytes) supplies the buffer (a pinned one for fast copies to a GPU); expect=(size, hash)
    checks the file's size and checksum and refuses a file that differs; expect=(size, "", {tensor:
    hash}) checks each tensor's bytes instead (a file written weight by weight). drop_cache evicts the
    file from the page cache afterwards (posix_fadvise), for honest SSD measurements.
    """
    digests = expect[2] if expect is not None and len(expect) > 2 and not expect[1] else None
    if digests is not None:
        want_size, expect = expect[0], None  # no whole-file hash: the tensors' own, below
    with _open_module_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if expect is not None and size != expect[0]:
            raise SlowllamaError(f"{path}: size {size} bytes, the manifest says {expect[0]} (truncated or altered)")
        header, start = read_header(f, path)
        data_len = size - start
        buf = alloc(data_len) if alloc else torch.empty(data_len, dtype=torch.uint8)
        view = memoryview(buf.numpy() if data_len else np.empty(0, np.uint8))
        if expect is None:
            if data_len and f.readinto(view) != data_len:
                raise SlowllamaError(f"{path}: truncated while reading")
        else:  # by chunks, each hashed on the hashing thread while the next is read (xxhash releases the GIL)
            h = Hasher(os.pread(f.fileno(), start, 0))
            hashed = None
            for begin in range(0, data_len, READ_CHUNK):
                end = min(begin + READ_CHUNK, data_len)
                if f.readinto(view[begin:end]) != end - begin:
                    raise SlowllamaError(f"{path}: truncated while reading")
                hashed = HASHER.submit(h.update, view[begin:end])  # in order: one thread
            if hashed is not None:
                hashed.result()
            if h.hexdigest() != expect[1]:
                raise SlowllamaError(f"{path}: checksum mismatch (altered or corrupted outside slowllama)")
        if drop_cache:
            drop_from_page_cache(f.fileno())
    out = {}
    for key in header:
        dtype, shape, begin, end = tensor_entry(header, key, path, data_len)
        out[key] = buf[begin:end].view(dtype).view(shape)
    if digests is not None:
        if set(digests) != set(out) or want_size != data_len + start:
            raise SlowllamaError(f"{path}: its tensors or size differ from the manifest's (truncated or altered)")
        for key, digest in digests.items():
            if Hasher(tensor_bytes(out[key])).hexdigest() != digest:
                raise SlowllamaError(f"{path}: checksum mismatch in {key!r} (altered or corrupted outside slowllama)")
    return out


def tensor_entry(header: dict, key: str, path: str, data_len: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one tensor of a parsed header, checked to lie inside the data section."""
    if key not in header:
        raise SlowllamaError(f"{path}: no tensor {key!r} (altered outside slowllama)")
    info = header[key]
    try:
        dtype = TORCH_DTYPES[info["dtype"]]
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(x) for x in info["shape"]]
    except (KeyError, TypeError, ValueError):
        raise SlowllamaError(f"{path}: bad header entry for {key!r}") from None
    if not 0 <= begin <= end <= data_len or end - begin != element_size(dtype) * int(np.prod(shape, dtype=np.int64)):
        raise SlowllamaError(f"{path}: tensor {key!r} lies outside the file (truncated or altered)")
    return dtype, shape, begin, end


def read_tensor(path: str, key: str, alloc: Optional[Callable[[int], torch.Tensor]] = None,
                digest: Optional[str] = None, drop_cache: bool = False) -> torch.Tensor:
    """Read one tensor of a file into its own buffer (a weight of a block streamed by weight); digest: the
    xxh3-128 its bytes must have (None: unchecked here)."""
    with _open_module_file(path) as f:
        header, start = read_header(f, path)
        dtype, shape, begin, end = tensor_entry(header, key, path, os.fstat(f.fileno()).st_size - start)
        buf = alloc(end - begin) if alloc else torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy() if end > begin else np.empty(0, np.uint8))
        f.seek(start + begin)
        h, hashed = Hasher(), None
        for chunk in range(0, end - begin, READ_CHUNK):  # each chunk hashed while the next is read
            part = view[chunk:min(chunk + READ_CHUNK, end - begin)]
            if f.readinto(part) != len(part):
                raise SlowllamaError(f"{path}: truncated while reading")
            if digest is not None:
                hashed = HASHER.submit(h.update, part)
        if hashed is not None:
            hashed.result()
        if drop_cache and hasattr(os, "posix_fadvise"):  # this tensor's pages only: the kernel may be reading ahead
            os.posix_fadvise(f.fileno(), start + begin, end - begin, os.POSIX_FADV_DONTNEED)
    if digest is not None and h.hexdigest() != digest:
        raise SlowllamaError(f"{path}: checksum mismatch in {key!r} (altered or corrupted outside slowllama)")
    return buf.view(dtype).view(shape)


def hash_file(path: str) -> tuple[int, str]:
    """(size, xxh3-128) of a whole file, read by chunks (to check a file whose tensors are read one by one)."""
    h, size = Hasher(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise SlowllamaError(f"{path}: cannot read ({e.strerror})") from None
    return size, h.hexdigest()


class PieceWriter:
    """A module file written tensor by tensor, in any order (the weights of a block streamed by weight, each
    written as soon as it is updated): the header is laid out from the shapes first, each tensor goes to its
    place with pwrite (no memory map: a full disk is an error, not a fault) and gets a checksum of its own."""

    def __init__(self, path: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path, self.specs = path, specs
        head, self.offsets, data_len = layout(specs)
        self.data_start, self.size = len(head), len(head) + data_len
        self.digests: dict[str, str] = {}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            _pwrite_all(fd, memoryview(head), 0)
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)

    def write(self, key: str, t: torch.Tensor) -> None:
        dtype, shape = self.specs[key]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key}: {t.dtype} {list(t.shape)}, the file holds {dtype} {list(shape)}")
        mv = tensor_bytes(t)
        fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            _pwrite_all(fd, mv, self.data_start + self.offsets[key][0])
        finally:
            os.close(fd)
        self.digests[key] = Hasher(mv).hexdigest()

    @property
    def missing(self) -> list[str]:
        return [k for k in self.specs if k not in self.digests]


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    while len(mv):
        n = os.pwrite(fd, mv[:1 << 30], offset)
        mv, offset = mv[n:], offset + n


class SliceWriter:
    """A preallocated safetensors file whose tensors are filled piece by piece (prepare's shard slices)."""

    def __init__(self, path: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path, self.specs = path, specs
        head, offsets, data_len = layout(specs)
        self.data_start = len(head)
        self.offsets = offsets
        # written with pwrite, never through a memory map: a full disk is an OSError (ENOSPC), not a SIGBUS
        self.fd = create_file(path)
        _pwrite_all(self.fd, memoryview(head), 0)
        os.ftruncate(self.fd, len(head) + data_len)

    def write(self, key: str, piece: torch.Tensor, dim: Optional[int] = None, start: int = 0) -> None:
        """Place `piece` at index `start` along `dim` of tensor `key` (dim None: the whole tensor)."""
        dtype, shape = self.specs[key]
        piece = piece.to(dtype).contiguous()
        begin, end = self.offsets[key]
        if dim is None:
            _pwrite_all(self.fd, tensor_bytes(piece), self.data_start + begin)
            return
        # the tensor's bytes as (rows before dim, size of dim, bytes of one index of dim): the piece is one
        # run of bytes per outer row, at its index along dim
        es = element_size(dtype)
        outer = int(np.prod(shape[:dim], dtype=np.int64))
        inner = int(np.prod(shape[dim + 1:], dtype=np.int64)) * es
        rows = np.frombuffer(tensor_bytes(piece), np.uint8).reshape(outer, -1)
        for r in range(outer):
            _pwrite_all(self.fd, memoryview(rows[r]), self.data_start + begin + (r * shape[dim] + start) * inner)

    def finish(self) -> tuple[int, str]:
        """fsync, then hash the finished file; returns (size, hash)."""
        os.fsync(self.fd)
        os.close(self.fd)
        h = Hasher()
        with open(self.path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
            size = f.tell()
        return size, h.hexdigest()

    def close(self) -> None:
        """Close the file without finishing it (a failed prepare)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def read_layout(path: str) -> tuple[list[tuple[str, str, list[int]]], dict]:
    """The tensors of a safetensors file as (name, dtype name, shape) in the order of their data, and its metadata.

    Checks that every tensor lies inside the file, so a truncated download is named here.
    """
    metadata: dict = {}
    if os.path.lexists(path):
        check_regular(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SlowllamaError(f"{path}: file missing") from None
    with f:
        header, start = read_header(f, path, metadata)
        size = os.fstat(f.fileno()).st_size
    entries = []
    for key, info in header.items():
        try:
            dtype, (begin, end), shape = info["dtype"], info["data_offsets"], [int(s) for s in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise SlowllamaError(f"{path}: bad header entry for {key!r}") from None
        if start + end > size:
            raise SlowllamaError(f"{path}: tensor {key!r} lies outside the file (truncated)")
        entries.append((begin, key, dtype, shape))
    entries.sort()
    return [(key, dtype, shape) for _, key, dtype, shape in entries], metadata


def write_streamed(path: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Optional[dict],
                   produce: Callable[[str], torch.Tensor], fsync: bool = True) -> int:
    """Write a safetensors file tensor by tensor, in spec order; produce(key) supplies each one (peak: one tensor).

    The header is laid out as the safetensors library lays it out (metadata first, compact JSON, padded
    with spaces), so a file with the same tensors, order and metadata comes out byte-identical.
    """
    head, _, data_len = layout(specs, metadata)
    with open_new(path) as f:
        f.write(head)
        for key, (dtype, shape) in specs.items():
            t = produce(key)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key}: produced {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}")
            f.write(tensor_bytes(t.cpu()))
            del t
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return len(head) + data_len
