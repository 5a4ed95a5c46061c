"""Memory budgets, the cache of activations that spills to the store's scratch folder beyond them, and the blocks'
autograd graphs kept from the forward pass where the budget holds them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch


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


class KeptGraphs:
    """The autograd graphs of the last `count` blocks of a training step, kept from its forward pass so that their
    backward needs no recompute: per block its module and, per microbatch, (input, output). Their bytes (an
    estimate: residency.kept_block_bytes, per block over all microbatches) are taken from the activation budget for the
    step and given back as each block's backward is done."""

    def __init__(self, budget: Budget, n_layers: int, count: int, block_bytes: int):
        self.budget, self.first, self.block_bytes = budget, n_layers - count, block_bytes
        self.count = count
        self.blocks: dict[int, tuple[object, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        budget.take(count * block_bytes)
        self._held = count

    def holds(self, index: int) -> bool:
        return index >= self.first

    def put(self, index: int, module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.blocks[index] = (module, pairs)

    def pop(self, index: int):
        """(module, [(input, output) per microbatch]) of a kept block, its budget given back once it is dropped."""
        kept = self.blocks.pop(index)
        self._give(1)
        return kept

    def _give(self, n: int) -> None:
        n = min(n, self._held)
        self._held -= n
        self.budget.give(n * self.block_bytes)

    def clear(self) -> None:
        self.blocks.clear()
        self._give(self._held)
