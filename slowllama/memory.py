"""Memory budgets, and the cache of activations that spills to the store's scratch folder beyond them."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from slowllama.errors import SlowllamaError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text, what: str) -> int:
    """'512M', '16G', '1.5GiB' or a plain byte count -> bytes (binary units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise SlowllamaError(f"{what}: cannot read {text!r} as a size (examples: 512M, 16G)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


class Budget:
    """A byte budget shared by the module cache and the activation cache of one memory tier."""

    def __init__(self, limit: int, name: str):
        self.limit, self.name = limit, name
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def try_take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def take(self, n: int) -> None:
        """Take n bytes even past the limit (what is in flight must be held)."""
        with self._lock:
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n

    @property
    def free(self) -> int:
        return self.limit - self.used


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Activations:
    """The inputs of each module for each microbatch, kept for the backward pass.

    Held on the compute device while its budget allows, then in host memory (a GPU's host budget),
    then written to the scratch folder as raw bytes and read back when the backward pass needs them.
    On cuda the host copies are pinned and made on a stream of their own, both ways, so they overlap
    the compute; prefetch() starts bringing back the input the backward pass needs next.
    """

    def __init__(self, budget: Budget, scratch: Path, device: torch.device, host_budget: Optional[Budget] = None):
        self.budget, self.scratch, self.device, self.host_budget = budget, Path(scratch), device, host_budget
        self.held: dict[tuple, tuple[torch.Tensor, Budget]] = {}
        self.spilled: dict[tuple, tuple[Path, torch.dtype, tuple]] = {}
        self.bytes_spilled = 0
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: dict[tuple, object] = {}  # host-held key -> event of its copy from the device
        self.fetched: dict[tuple, tuple[torch.Tensor, object]] = {}  # key -> (device copy, event), prefetched

    def put(self, key: tuple, t: torch.Tensor) -> None:
        n = nbytes(t)
        if self.budget.try_take(n):
            self.held[key] = (t, self.budget)
            return
        if self.host_budget is not None and self.host_budget.try_take(n):
            self.held[key] = (self._to_host(key, t), self.host_budget)
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / ("act_" + "_".join(map(str, key)) + ".bin")
        t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tofile(path)
        self.spilled[key] = (path, t.dtype, tuple(t.shape))
        self.bytes_spilled += n

    def _to_host(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.to("cpu")
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # torch's caching host allocator reuses these
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            self.copied[key] = torch.cuda.Event()
            self.copied[key].record(self.stream)
        return host

    def prefetch(self, key: tuple) -> None:
        """Start copying a host-held input back to the device (cuda), to be taken by pop()."""
        if not self.cuda or key in self.fetched or key not in self.held:
            return
        t, budget = self.held[key]
        if budget is not self.host_budget:
            return
        self.stream.wait_event(self.copied.pop(key))
        with torch.cuda.stream(self.stream):
            dev = t.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.fetched[key] = (dev, event)

    def _from_host(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        if key in self.fetched:
            dev, event = self.fetched.pop(key)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            dev.record_stream(current)
            return dev
        if key in self.copied:
            torch.cuda.current_stream(self.device).wait_event(self.copied.pop(key))
        return t.to(self.device, non_blocking=self.cuda)

    def get(self, key: tuple) -> torch.Tensor:
        """A copy of a kept input on the device, leaving it kept."""
        if key in self.held:
            if key in self.copied:
                torch.cuda.current_stream(self.device).wait_event(self.copied[key])
            return self.held[key][0].to(self.device)
        path, dtype, shape = self.spilled[key]
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        return raw.view(dtype).view(shape).to(self.device)

    def pop(self, key: tuple) -> torch.Tensor:
        if key in self.held:
            t, budget = self.held.pop(key)
            budget.give(nbytes(t))
            return self._from_host(key, t) if budget is self.host_budget else t.to(self.device)
        t = self.get(key)
        self.spilled.pop(key)[0].unlink(missing_ok=True)
        return t

    def clear(self) -> None:
        for key in list(self.held):
            self.pop(key)
        for path, _, _ in self.spilled.values():
            path.unlink(missing_ok=True)
        self.spilled.clear()
        self.fetched.clear()
        self.copied.clear()


def host_peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
