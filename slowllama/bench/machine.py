"""Measurements of the machine a benchmark runs on: disk, page cache, host <-> GPU copies, matmul peak, RSS.

Each function measures one thing, the way a training step uses it: whole-file sequential reads
and fsynced writes on the store's own filesystem, pinned copies, large matmuls in the compute dtype.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from slowllama.sizes import host_peak_rss
from slowllama.store.atomic import write_json_atomic

CHUNK = 64 << 20  # bytes per read/write call: large enough for full sequential speed


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on cpu)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def disk_write_bandwidth(path: str, nbytes: int) -> float:
    """Sequential write bandwidth of the filesystem holding `path`, in bytes/s.

    Writes `nbytes` of random (incompressible) bytes to a new file at `path` in 64 MiB chunks and
    fsyncs it; the time includes the fsync, so the bytes reached the disk, not just the page cache.
    The file is left in place for disk_read_bandwidth (the caller removes it).
    """
    chunk = np.random.default_rng(0).integers(0, 256, size=min(CHUNK, nbytes), dtype=np.uint8)
    view = memoryview(chunk)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        written = 0
        while written < nbytes:
            written += f.write(view[:min(len(view), nbytes - written)])
        os.fsync(f.fileno())
    return nbytes / (time.perf_counter() - t0)


def _read_whole(path: str) -> int:
    """Read a file from start to end in 64 MiB chunks into one reused buffer; returns the bytes read."""
    size = os.path.getsize(path)
    buf = np.empty(min(CHUNK, max(size, 1)), dtype=np.uint8)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def drop_from_page_cache(path: str) -> None:
    """Ask the kernel to evict the file's pages (posix_fadvise DONTNEED; only clean pages can go)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def page_cache_residency(path: str) -> Optional[float]:
    """The fraction of the file's pages that are in the page cache (Linux mincore), None where unknown."""
    size = os.path.getsize(path)
    if not sys.platform.startswith("linux") or size == 0:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn, mincore, munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = mmap_fn(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = np.zeros(pages, dtype=np.uint8)  # one byte per page; bit 0: resident
            if mincore(addr, size, vec.ctypes.data) != 0:
                return None
            return float((vec & 1).sum()) / pages
        finally:
            munmap(addr, size)
    finally:
        os.close(fd)


def disk_read_bandwidth(path: str) -> tuple[float, Optional[float]]:
    """Sequential read bandwidth from the disk, in bytes/s, and how much of the file was still cached.

    Evicts the file from the page cache (posix_fadvise DONTNEED: it must have been fsynced, as
    disk_write_bandwidth does), then reads it whole in 64 MiB chunks. Returns (bytes/s, the
    fraction of the file's pages still in the page cache when the read began): 0.0 means the
    figure is the disk's; near 1.0 means the drop failed and it is the page cache's; None: unknown.
    """
    drop_from_page_cache(path)
    resident = page_cache_residency(path)
    t0 = time.perf_counter()
    n = _read_whole(path)
    return n / (time.perf_counter() - t0), resident


def page_cache_read_bandwidth(path: str) -> float:
    """Read bandwidth of a file that is in the page cache, in bytes/s: one read to load it, one timed."""
    _read_whole(path)
    t0 = time.perf_counter()
    n = _read_whole(path)
    return n / (time.perf_counter() - t0)


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20,
                   reps: int = 5) -> tuple[Optional[float], Optional[float]]:
    """Pinned host -> GPU and GPU -> pinned host copy bandwidth in bytes/s; (None, None) off cuda.

    Copies one `nbytes` buffer `reps` times each way with non_blocking copies, timed by CUDA events
    around the whole batch (after one untimed copy each way).
    """
    if device.type != "cuda":
        return None, None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = []
    for dst, src in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        out.append(nbytes * reps / (start.elapsed_time(end) / 1e3))
    del host, dev
    torch.cuda.empty_cache()
    return out[0], out[1]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, reps: Optional[int] = None,
                rounds: int = 3) -> float:
    """FLOP/s of square n x n matmuls in `dtype` on `device` (2 n^3 FLOPs each), the best of `rounds`.

    Each round runs `reps` matmuls back to back, timed with CUDA events on cuda, perf_counter
    (after a device sync) elsewhere; one untimed matmul warms up first. Defaults: n 8192 and 50
    matmuls per round on cuda, n 1024 and 4 elsewhere.
    """
    on_cuda = device.type == "cuda"
    n = n or (8192 if on_cuda else 1024)
    reps = reps or (50 if on_cuda else 4)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    synchronize(device)
    best = 0.0
    for _ in range(rounds):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            synchronize(device)
            seconds = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 * reps / seconds)
    del a, b, c
    if on_cuda:
        torch.cuda.empty_cache()
    return best


def reset_peak_rss() -> bool:
    """Restart the process's peak-RSS count from its current RSS (Linux: /proc/self/clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size in bytes since the last reset_peak_rss (VmHWM), else of the process's life."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_peak_rss()


def measure_disk(folder, nbytes: int, log: Callable[[str], None] = lambda m: None) -> dict:
    """Disk write, disk read (page cache dropped) and page-cache read bandwidth of `folder`'s filesystem.

    Uses a probe file of `nbytes` in `folder`, removed afterwards. Returns bytes/s figures and
    `cache_dropped`: whether the drop left no page of the probe cached (None: cannot be checked).
    """
    path = os.path.join(folder, f".slowllama-probe-{os.getpid()}")
    try:
        log(f"measuring the disk with a {nbytes / 2**20:.0f} MiB file in {folder}")
        write = disk_write_bandwidth(path, nbytes)
        read, resident = disk_read_bandwidth(path)
        cached = page_cache_read_bandwidth(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    dropped = None if resident is None else resident < 0.01
    return {"disk_write": write, "disk_read": read, "page_cache_read": cached,
            "resident_after_drop": resident, "cache_dropped": dropped}


# ---- the machine's measured limits, kept for `slowllama plan` ---------------------------------------------

def machine_cache_path() -> Path:
    """Where bench keeps the machine's measurements: $XDG_CACHE_HOME/slowllama/machine.json (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slowllama" / "machine.json"


def machine_kind(device_type: str, dtype_name: str) -> str:
    """The cache's key of a record: the device kind and the dtype its matmul peak was measured in."""
    return f"{device_type}/{dtype_name}"


def load_machines(path: Optional[Path] = None) -> dict:
    """The cached records by machine_kind ({} when there is no cache or it cannot be read: measure again)."""
    path = path or machine_cache_path()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return cached if isinstance(cached, dict) else {}


def save_machine(kind: str, record: dict, path: Optional[Path] = None) -> Optional[Path]:
    """Keep one kind's record beside the others (a write of the whole file, atomic); returns the path, or
    None when the cache folder cannot be written (the benchmark does not fail for that)."""
    path = path or machine_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**load_machines(path), kind: {**record, "measured_at": time.time()}})
    except OSError:
        return None
    return path
