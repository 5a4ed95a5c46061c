"""The load/store pipeline: modules read ahead of their use, kept resident by budget, written back in the background.

Each pass over the model declares the order in which it will use modules (a plan of (kind, name)
keys: weights, then the parts of optimizer state and master weights where the update needs them,
state_parts.py; the plan repeats, so the end of one step looks ahead into the next). A reader thread
loads the next modules of the plan while the current one computes: the file is read straight into a
host buffer (pinned on cuda), checked against the manifest's checksum, and copied to the device on a
copy stream.

Modules stay resident, on the device first, then in host memory, as far as the budgets allow. When
room is needed, the resident module whose next use lies farthest ahead goes first (Belady's rule:
optimal for a known order). With the zigzag of forward and backward passes, the last modules of
the forward pass are the first of the backward pass and the last of the backward pass the first of
the next forward pass, so those are never read twice.

Updated modules are copied back into host buffers (async on cuda) and written to the store by a
writer thread through a bounded queue; flush() waits until every write is durable, which a step's
commit requires. With deferred writes (a model that stays resident), updates only mark modules
dirty, and write_dirty() queues them at a commit point.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.engine.activations import Budget, nbytes
from slowllama.store.state_parts import part_module
from slowllama.store.store import Store

Key = tuple[str, str]  # (kind, name): "modules" and a module's name, or "optim"/"master" and a part's


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(nbytes(t) for t in tensors.values())


class BufferPool:
    """Pinned host buffers for reads and write-backs on cuda (fast async copies).

    Pinning is slow (cudaHostAlloc), so released buffers are kept for reuse, up to `retain` bytes:
    the staging memory of reads and writes in flight, part of the working set. A request takes the
    smallest kept buffer that holds it (at most twice its size), as a view. A buffer in use counts
    against the host budget. A buffer goes back to the pool only when nothing can use it any more:
    its copy to the device is done, its write is done, or the host-resident module it held was
    evicted (the compute only ever sees device copies of those).
    """

    def __init__(self, budget: Budget, retain: int):
        self.budget, self.retain = budget, retain
        self.free: list[torch.Tensor] = []  # released buffers, oldest first
        self.lent: dict[int, torch.Tensor] = {}  # data_ptr of a view handed out -> its buffer
        self.lock = threading.Lock()

    def take(self, n: int) -> torch.Tensor:
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if n <= b.numel() <= 2 * n]
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel())) if fits else None
        if buf is None:
            buf = pinned_buffer(max(n, 1))
        self.budget.take(buf.numel())
        view = buf[:n]
        with self.lock:
            self.lent[view.data_ptr()] = buf
        return view

    def give(self, view: torch.Tensor) -> None:
        with self.lock:
            buf = self.lent.pop(view.data_ptr())
            self.free.append(buf)
            dropped = []
            while sum(b.numel() for b in self.free) > self.retain:
                dropped.append(self.free.pop(0))
        self.budget.give(buf.numel())
        for b in dropped:
            unpin(b)


def pinned_buffer(n: int) -> torch.Tensor:
    """n bytes of page-locked host memory. Large buffers exactly: whole pages of plain memory of their own,
    registered with CUDA (torch's pinned allocator rounds each block up to a power of two and keeps freed blocks
    pinned, beyond any budget: 13B at --max-memory 3G peaked 1 GiB higher). Small ones, and where registering
    fails, from torch's allocator."""
    if n >= REGISTER_MIN:
        page = mmap.PAGESIZE
        size = -(-n // page) * page
        raw = torch.empty(size + page, dtype=torch.uint8)
        start = (-raw.data_ptr()) % page
        buf = raw[start:start + n]  # pages no other allocation shares: registering them cannot overlap another
        try:
            if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0)) == 0:
                _REGISTERED.add(buf.data_ptr())
                return buf
        except (AttributeError, RuntimeError, TypeError):
            pass
    return torch.empty(n, dtype=torch.uint8, pin_memory=True)


REGISTER_MIN = 1 << 20
_REGISTERED: set[int] = set()  # data_ptrs of the buffers pinned_buffer registered


def unpin(buf: torch.Tensor) -> None:
    """Before a pool buffer goes: unregister it if pinned_buffer registered it (its memory is then freed)."""
    if buf.data_ptr() in _REGISTERED:
        _REGISTERED.discard(buf.data_ptr())
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


@dataclass
class Entry:
    tensors: dict[str, torch.Tensor]  # on the device (tier "device") or in host memory (tier "host")
    tier: str
    counted: int  # bytes this entry holds of its tier's budget (0 when a pool buffer, counted by the pool, backs it)
    buffer: Optional[torch.Tensor] = None  # the pool buffer behind host tensors
    dirty: bool = False  # newer than the store's copy
    dirty_rows: Optional[dict[str, torch.Tensor]] = None  # if dirty: {weight: the row ids that differ}; None: all
    ready: Optional[object] = None  # host tensors copied from the device: a cuda event to wait for first


class Pipeline:
    def __init__(self, store: Store, device: torch.device, device_budget: Budget, host_budget: Budget,
                 lookahead: int = 2, write_queue: int = 2, staging: int = 1 << 62, read_bytes: int = 1 << 62,
                 write_bytes: int = 1 << 62):
        self.store, self.device = store, device
        self.cuda = device.type == "cuda"
        self.split = device.type != "cpu"  # device memory apart from host memory
        self.device_budget = device_budget
        self.host_budget = host_budget if self.split else device_budget
        self.pool = BufferPool(self.host_budget, retain=staging) if self.cuda else None
        self.lookahead = lookahead
        # reads ahead and writes in flight are capped in bytes too (at least one of each may always be in flight):
        # the working set counts them so, whatever the sizes of the modules, weights and parts in the plan
        self.read_bytes, self.write_bytes = read_bytes, write_bytes
        self.write_sizes: dict[int, int] = {}  # id of a write's future -> bytes it holds
        self.entries: dict[Key, Entry] = {}
        self.loading: dict[Key, Future] = {}
        self.staged: dict[Key, tuple[dict, object]] = {}  # host-resident modules already copied to the device
        self.writing: dict[Key, Future] = {}
        self.plan: list[Key] = []
        self.uses: dict[Key, list[int]] = {}  # key -> its positions in the plan
        self.pos = 0
        self.current: set[Key] = set()  # the keys of the module in use (and its state's parts) until put: kept
        self.in_use: dict[Key, dict[str, torch.Tensor]] = {}  # device copies of host-resident keys of that module
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowllama-read")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowllama-write")
        self.writes: deque[Future] = deque()
        self.write_queue = write_queue
        # host->device and device->host copies on streams of their own: PCIe carries both ways at once
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.d2h_stream = torch.cuda.Stream(device) if self.cuda else None
        self.h2d_bytes = self.d2h_bytes = 0
        self.read_wait = self.write_wait = 0.0  # seconds the compute thread waited on reads / writes

    # ---- the plan ---------------------------------------------------------------------------
    def set_plan(self, plan: list[Key]) -> None:
        """The order in which the coming passes (repeating) will ask for modules."""
        self.plan, self.pos, self.uses = list(plan), 0, {}
        for i, key in enumerate(self.plan):
            self.uses.setdefault(key, []).append(i)

    def _distance(self, key: Key) -> int:
        """How far ahead in the cyclic plan `key` is needed next (len(plan) if never)."""
        n, uses = len(self.plan), self.uses.get(key)
        if not uses:
            return n
        i = bisect.bisect_left(uses, self.pos)
        return uses[i] - self.pos if i < len(uses) else uses[0] + n - self.pos

    def _advance(self, key: Key) -> None:
        """Move past `key` in the plan (asking again for the key just used does not move)."""
        n = len(self.plan)
        if n and self.plan[(self.pos - 1) % n] == key:
            return
        d = self._distance(key)
        if d < n:
            self.pos = (self.pos + d + 1) % n

    def has(self, key: Key) -> bool:
        """Whether `key` exists: resident (perhaps newer than the store) or in the store."""
        return key in self.entries or self.store.has(key[1], key[0])

    # ---- loading ----------------------------------------------------------------------------
    def get(self, key: Key) -> dict[str, torch.Tensor]:
        """The tensors of `key` on the device, in the store's dtypes; waits for its read if needed."""
        self._advance(key)
        if not any(part_module(k[1]) == part_module(key[1]) for k in self.current):
            self.current, self.in_use = set(), {}
        self.current.add(key)
        if key in self.in_use:  # a host-resident module asked for again (by its update): the copy made for its use
            return self.in_use[key]
        self._collect()
        entry = self.entries.get(key)
        if entry is None:
            t0 = time.perf_counter()
            future = self.loading.pop(key, None) or self.reader.submit(self._load, key)
            loaded = future.result()
            self.read_wait += time.perf_counter() - t0
            entry = self._admit(key, *loaded)
        staged = self.staged.pop(key, None)
        self._prefetch()
        if entry.tier == "device":
            return entry.tensors
        if staged is not None:
            tensors, event = staged
            self._wait(event, tensors)
        else:
            if entry.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(entry.ready)
            self.h2d_bytes += tensors_bytes(entry.tensors)
            tensors = {k: v.to(self.device, non_blocking=self.cuda) for k, v in entry.tensors.items()}
        self.in_use[key] = tensors
        return tensors

    def _collect(self) -> None:
        """Admit finished reads that the plan no longer needs soon, so that their memory is counted and can be
        evicted (reads of the next modules are part of the working set until used)."""
        for key in [k for k, f in self.loading.items() if f.done() and self._distance(k) >= self.lookahead]:
            self._admit(key, *self.loading.pop(key).result())

    def _prefetch(self) -> None:
        """Start on the next modules of the plan: read those not resident, stage host-resident ones."""
        n = len(self.plan)
        for d in range(min(self.lookahead, n)):
            key = self.plan[(self.pos + d) % n]
            entry = self.entries.get(key)
            if entry is not None:
                if entry.tier == "host" and key not in self.staged:
                    self.staged[key] = self._copy_to_device(entry.tensors, entry.ready)
            elif key not in self.loading and self.store.has(key[1], key[0]):
                if self.loading and self._loading_bytes() + self.store.key_bytes(key[1], key[0]) > self.read_bytes:
                    break
                self.loading[key] = self.reader.submit(self._load, key)

    def _loading_bytes(self) -> int:
        return sum(self.store.key_bytes(k[1], k[0]) for k in self.loading)

    def _load(self, key: Key):
        """Reader thread: file -> host buffer -> the device (on the copy stream) when there is room."""
        kind, name = key
        pending = self.writing.get(key)
        if pending is not None:
            pending.result()  # a deferred write of this very module must land first
        if not self.cuda:  # plain memory: the read buffer becomes the module's tensors (copied over on mps)
            host = self.store.read(name, kind)
            if not self.split:
                return host, None, None, "device"
            if self.device_budget.free < tensors_bytes(host):
                return host, None, None, "host"
            return {k: v.to(self.device) for k, v in host.items()}, None, None, "device"
        holder = {}

        def alloc(n: int) -> torch.Tensor:
            holder["buf"] = self.pool.take(n)
            return holder["buf"]

        host = self.store.read(name, kind, alloc=alloc)
        buf = holder["buf"]
        if self.device_budget.free < tensors_bytes(host):
            return host, buf, None, "host"
        dev, event = self._copy_to_device(host)
        return dev, buf, event, "device"

    def _copy_to_device(self, host: dict[str, torch.Tensor], ready=None):
        """Start copying host tensors to the device on the copy stream; returns (tensors, event).
        `ready`: the event of a copy from the device into `host` (another stream) to wait for first."""
        self.h2d_bytes += tensors_bytes(host)
        if not self.cuda:
            return {k: v.to(self.device) for k, v in host.items()}, None
        if ready is not None:
            self.copy_stream.wait_event(ready)
        with torch.cuda.stream(self.copy_stream):
            dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return dev, event

    def _wait(self, event, tensors: dict[str, torch.Tensor]) -> None:
        """Make the compute stream wait for a copy, and own the copied tensors from now on."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)

    def _admit(self, key: Key, tensors, buf, event, tier) -> Entry:
        self._wait(event, tensors)
        if buf is not None and tier == "device":
            event.synchronize()  # the host buffer goes back to the pool: the copy must have read it
            self.pool.give(buf)
            buf = None
        if buf is not None:  # a pinned host-resident module: its buffer is counted by the pool
            entry = Entry(tensors, tier, 0, buffer=buf)
        else:
            size = tensors_bytes(tensors)
            (self.device_budget if tier == "device" else self.host_budget).take(size)
            entry = Entry(tensors, tier, size)
        self.entries[key] = entry
        self._fit()
        return entry

    def _fit(self) -> None:
        """Evict residents, the farthest next use first, until both budgets hold (dirty ones are written first)."""
        budgets = [("device", self.device_budget)] + ([("host", self.host_budget)] if self.split else [])
        for tier, budget in budgets:
            while budget.used > budget.limit:
                victims = [k for k, e in self.entries.items() if e.tier == tier and k not in self.current]
                if not victims:
                    break
                self._evict(max(victims, key=self._distance))

    def _evict(self, key: Key) -> None:
        """Move a module off the device into host memory if it has room, else drop it (writing it first
        if it is newer than the store). The caller may still hold its tensors: memory is freed when it lets go."""
        entry = self.entries.pop(key)
        if entry.tier == "device" and self.split and self.host_budget.free >= entry.counted:
            host, buf, event = self._copy_to_host(entry.tensors)
            self.entries[key] = Entry(host, "host", 0, buffer=buf, dirty=entry.dirty, dirty_rows=entry.dirty_rows,
                                      ready=event)
            self._release(key, entry)
            return
        staged = self.staged.pop(key, None)
        if staged is not None and staged[1] is not None:
            staged[1].synchronize()  # a copy from its host buffer is in flight
        if entry.dirty:  # the write takes the host buffer over, and gives it back when done
            self._write(key, entry.tensors, entry.ready, owned=entry.buffer)
            entry.buffer = None
        self._release(key, entry)

    def _release(self, key: Key, entry: Entry) -> None:
        budget = self.device_budget if entry.tier == "device" else self.host_budget
        budget.give(entry.counted)
        if entry.buffer is not None:
            if entry.ready is not None:
                entry.ready.synchronize()  # the copy into the buffer must be over before it is reused
            pending = self.writing.get(key)
            if pending is not None and entry.tier == "host":
                pending.result()  # a write may still be reading it
            self.pool.give(entry.buffer)

    def _copy_to_host(self, tensors: dict[str, torch.Tensor]):
        """Start copying device tensors into one host buffer (pinned, async on cuda); returns (host, buffer, event)."""
        size = tensors_bytes(tensors)
        self.d2h_bytes += size
        if not self.cuda:  # mps: plain copies
            return {k: t.to("cpu") for k, t in tensors.items()}, None, None
        buf = self.pool.take(size)
        host, off = {}, 0
        for k, t in tensors.items():
            host[k] = buf[off:off + nbytes(t)].view(t.dtype).view(t.shape)
            off += nbytes(t)
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h_stream):
            for k, t in tensors.items():
                host[k].copy_(t, non_blocking=True)
                if t.is_cuda:
                    t.record_stream(self.d2h_stream)
            event = torch.cuda.Event()
            event.record(self.d2h_stream)
        return host, buf, event

    # ---- updates and writes -----------------------------------------------------------------
    def put(self, key: Key, tensors: dict[str, torch.Tensor], persist: bool,
            rows: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The new version of `key` (device tensors): kept if it fits; written to the store now if persist,
        else marked dirty (written at the next write_dirty or when evicted).
        rows = {weight: row ids}: only those rows differ from the store's version, and only they are
        written where the store finds a row patch worth it."""
        self.in_use.pop(key, None)
        self.current.discard(key)  # done with for this use: it may be evicted like any other
        old = self.entries.pop(key, None)
        if old is not None and old.dirty and rows is not None:  # rows changed since the store's version
            rows = None if old.dirty_rows is None else {
                k: torch.unique(torch.cat([old.dirty_rows[k].to(ids.device), ids])) for k, ids in rows.items()}
        if old is not None:
            self._release(key, old)
        size = tensors_bytes(tensors)
        self.device_budget.take(size)
        self.entries[key] = Entry(tensors, "device", size, dirty=not persist, dirty_rows=None if persist else rows)
        self.staged.pop(key, None)
        if persist:
            self._write_changed(key, tensors, rows)
        self._fit()

    def _write_changed(self, key: Key, tensors: dict[str, torch.Tensor], rows: Optional[dict[str, torch.Tensor]],
                       ready=None) -> None:
        """Write what changed of a module: some rows (a row patch, where the store finds it worth it) or all."""
        if rows is not None and self.store.rows_worth_writing(
                key[1], sum(len(ids) * (8 + nbytes(tensors[k][0])) for k, ids in rows.items()), key[0]):
            if ready is not None:
                ready.synchronize()  # host tensors still being copied from the device
            self._write_rows(key, {k: (ids, tensors[k][ids.to(tensors[k].device)]) for k, ids in rows.items()})
        else:
            self._write(key, tensors, ready)

    def _write(self, key: Key, tensors: dict[str, torch.Tensor], ready=None, owned=None) -> None:
        """Queue the write of a module (copied to a host buffer first, async on cuda); waits while the queue
        is full. `ready`: an event host tensors wait for (a copy from the device into them); `owned`: their
        pool buffer, handed to the write, which gives it back when done."""
        buf, event, host = owned, None, tensors
        on_device = any(t.device.type != "cpu" for t in tensors.values())
        if on_device:
            host, buf, event = self._copy_to_host(tensors)
        elif ready is not None:
            ready.synchronize()
        self._queue(key, self._write_job, key, host, buf, event, size=tensors_bytes(host))

    def _write_rows(self, key: Key, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queue the write of some rows of a module (small: copied to the host here)."""
        host = {k: (ids.cpu(), values.cpu()) for k, (ids, values) in rows.items()}
        self._queue(key, self.store.write_rows, key[1], host, key[0])

    def _queue(self, key: Key, job, *args, size: int = 0) -> None:
        """Run job(*args) on the writer thread, once fewer than write_queue writes, of at most write_bytes with
        this one's `size`, are in flight."""
        t0 = time.perf_counter()
        while self.writes and (len(self.writes) >= self.write_queue
                               or sum(self.write_sizes.values()) + size > self.write_bytes):
            done = self.writes.popleft()
            self.write_sizes.pop(id(done), None)
            done.result()
        self.write_wait += time.perf_counter() - t0
        future = self.writer.submit(job, *args)
        self.writes.append(future)
        self.write_sizes[id(future)] = size
        self.writing[key] = future
        if self.write_queue == 0:  # synchronous writes (for comparison): wait for this one too
            self.flush()

    def _write_job(self, key: Key, host, buf, event) -> None:
        try:
            if event is not None:
                event.synchronize()
            self.store.write(key[1], host, kind=key[0])
        finally:
            if buf is not None:
                self.pool.give(buf)

    def write_dirty(self) -> None:
        """Queue the write of every resident module newer than the store (deferred commits)."""
        for key, entry in self.entries.items():
            if entry.dirty:
                self._write_changed(key, entry.tensors, entry.dirty_rows, entry.ready)
                entry.dirty, entry.dirty_rows = False, None

    def flush(self) -> None:
        """Wait until every queued write is in the store; raises the first write's error."""
        t0 = time.perf_counter()
        try:
            while self.writes:
                self.writes.popleft().result()
        finally:
            self.writing.clear()
            self.write_sizes.clear()
            self.write_wait += time.perf_counter() - t0

    def discard(self) -> None:
        """Forget everything resident, staged and in flight (after a failed step: it may hold uncommitted updates)."""
        for future in list(self.writes) + list(self.loading.values()):
            try:
                result = future.result()
            except Exception:
                continue
            if isinstance(result, tuple):
                _, buf, event, _ = result
                if event is not None:
                    event.synchronize()
                if buf is not None:
                    self.pool.give(buf)
        self.writes.clear()
        self.write_sizes.clear()
        self.writing.clear()
        self.loading.clear()
        self.staged.clear()
        self.in_use.clear()
        for key in list(self.entries):
            self._release(key, self.entries.pop(key))

    def forget(self, key: Key) -> None:
        """Drop a resident module that is no newer than the store (another process may change the store's)."""
        future = self.loading.pop(key, None)
        if future is not None:  # a read ahead of it: admitted, then dropped like a resident one
            with contextlib.suppress(Exception):
                self._admit(key, *future.result())
        entry = self.entries.get(key)
        if entry is not None and not entry.dirty:
            staged = self.staged.pop(key, None)
            if staged is not None and staged[1] is not None:
                staged[1].synchronize()  # a copy from its host buffer is in flight
            self._release(key, self.entries.pop(key))

    def resident(self) -> dict[str, int]:
        """Bytes of modules resident per tier."""
        out = {"device": 0, "host": 0}
        for e in self.entries.values():
            out[e.tier] += tensors_bytes(e.tensors)
        return out

    def close(self) -> None:
        self.reader.shutdown(wait=True)
        self.writer.shutdown(wait=True)
