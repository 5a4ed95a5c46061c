"""Several processes, launched by torchrun: data parallelism over the windows of each step.

Every rank runs its share of a step's windows through the same module at the same time. Each module has
an owner rank (owners.py, replicas.py): it alone reads the module from the store and broadcasts it to the
other ranks, receives the module's gradient summed over all ranks, applies the optimizer, keeps the
optimizer state and writes the module's files. Rank 0 commits each step once every rank's files are
durable (train/checkpoints.py). A rank reads and writes only the files of the modules it owns, in the one
store folder that every rank sees (one host, or a filesystem shared between hosts). Ranks that do not see
rank 0's folder (other hosts with only its manifest and tokenizer) own nothing: then rank 0 owns every
module and the others only compute (commands/finetune.py checks at start). On the shares of a store split
across hosts (store/shares.py), each host's share holds its own ranks' modules and fixes the owners
(train/shares.py). When the whole model fits in a rank's device budget, the ranks keep a copy of every
module they do not own, sent once and then after each update; otherwise every use of a module is a
broadcast from its owner.

torch.distributed does the communication: NCCL between GPUs, gloo on CPUs.
"""

from __future__ import annotations

import faulthandler
import hashlib
import math
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from slowllama.errors import SlowllamaError

# a rank may wait this long for the others, e.g. while rank 0 alone evaluates or writes a commit
TIMEOUT = timedelta(hours=2)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Fleet:
    """This process's place among the ranks; with one rank every method is free and does nothing."""

    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None  # where collectives put their tensors (the compute device)
    # every rank sees rank 0's store folder, so each can own a share of the modules; if not, rank 0 owns them all
    shared_store: bool = True
    # {module: rank} fixed by a store split across hosts (each host's share holds its ranks' modules); None: the
    # ranks deal the modules out among themselves (owners.py)
    owners: Optional[dict[str, int]] = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ---- the step's windows -----------------------------------------------------------------------
    def share(self, n_windows: int, batch_size: int) -> tuple[slice, int]:
        """This rank's windows of a step's n_windows, and the step-wide index of its first microbatch.

        Rank r takes the r-th of `world` equal contiguous parts. When every part is a whole number of
        microbatches (world divides the accumulation), rank r's microbatches are exactly those of the
        single-process step, with the same indices, so dropout masks match too.
        """
        per = n_windows // self.world
        micro_per_rank = math.ceil(per / batch_size)
        return slice(self.rank * per, (self.rank + 1) * per), self.rank * micro_per_rank

    def rank_batch(self, batch_size: int, accumulate: int) -> tuple[int, int]:
        """(windows per microbatch, microbatches) of this rank's share of a step: what its memory is sized for."""
        per = batch_size * accumulate // self.world
        return min(batch_size, per), math.ceil(per / batch_size)

    # ---- collectives --------------------------------------------------------------------------------
    def sum(self, value: float) -> float:
        """The sum of a number over ranks (in fp64), the same on every rank."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item()

    def max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def broadcast_object(self, obj):
        """Rank 0's obj, on every rank (small picklable values only: counters, flags)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, tensors: dict[str, torch.Tensor], src: int = 0) -> None:
        """Rank src's tensors into the same-shaped tensors of the other ranks, in place (key order)."""
        if not self.active:
            return
        for key in sorted(tensors):
            torch.distributed.broadcast(tensors[key], src=src)

    def reduce(self, grads: dict[str, torch.Tensor], dst: int = 0) -> dict[str, torch.Tensor]:
        """The sum over ranks of each gradient, on rank dst (other ranks get their own back, unused).

        One flat buffer per dtype: one collective per module instead of one per tensor. The sum is
        taken in the gradients' dtype, as their accumulation over microbatches is.
        """
        if not self.active:
            return grads
        summed = _summed(grads, lambda flat: torch.distributed.reduce(flat, dst=dst))
        return summed if self.rank == dst else grads  # only dst's buffers hold the sums

    def broadcast_async(self, tensors: dict[str, torch.Tensor], src: int) -> Callable[[], None]:
        """Start broadcast(); returns the wait for it (until then the tensors must be left alone)."""
        if not self.active:
            return lambda: None
        works = [torch.distributed.broadcast(tensors[key], src=src, async_op=True) for key in sorted(tensors)]
        return lambda: _wait(works)

    def reduce_async(self, grads: dict[str, torch.Tensor], dst: int) -> Callable[[], dict[str, torch.Tensor]]:
        """Start reduce(); returns the wait for it, which returns what reduce() does. The collectives run in the
        background (gloo's threads; NCCL's own stream, which wait() joins to the current one)."""
        if not self.active:
            return lambda: grads
        packed = _packed(grads)
        works = [torch.distributed.reduce(flat, dst=dst, async_op=True) for _, flat in packed]

        def wait() -> dict[str, torch.Tensor]:
            _wait(works)
            return _unpacked(grads, packed) if self.rank == dst else grads

        return wait

    def all_reduce(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sum over ranks of each gradient, on every rank."""
        if not self.active:
            return grads
        return _summed(grads, torch.distributed.all_reduce)

    # ---- checks -------------------------------------------------------------------------------------
    def check_same(self, settings: dict, data_digest: str) -> None:
        """Every rank must run the same settings on the same data: one line naming what differs."""
        if not self.active:
            return
        mine = {**settings, "_data": data_digest}
        everyone = self.gather_objects(mine)
        first = everyone[0]
        for rank, theirs in enumerate(everyone[1:], start=1):
            for key in sorted(set(first) | set(theirs)):
                if first.get(key) != theirs.get(key):
                    if key == "_data":
                        raise SlowllamaError(f"--data: rank {rank} read other tokens than rank 0 (the data files "
                                             "differ between ranks)")
                    raise SlowllamaError(f"--{key.replace('_', '-')}: differs between ranks (rank 0: "
                                         f"{first.get(key)!r}, rank {rank}: {theirs.get(key)!r})")

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _summed(grads: dict[str, torch.Tensor], collective) -> dict[str, torch.Tensor]:
    """Run `collective` (a sum) on the gradients packed into one flat buffer per dtype, in key order
    (one collective per module instead of one per tensor); the sums, unpacked."""
    packed = _packed(grads)
    for _, flat in packed:
        collective(flat)
    return _unpacked(grads, packed)


def _packed(grads: dict[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """The gradients in one flat buffer per dtype, in key order: (keys, buffer) each."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in sorted(grads):
        by_dtype.setdefault(grads[key].dtype, []).append(key)
    return [(keys, torch.cat([grads[k].reshape(-1) for k in keys])) for keys in by_dtype.values()]


def _unpacked(grads: dict[str, torch.Tensor], packed: list[tuple[list[str], torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for keys, flat in packed:
        for k, part in zip(keys, flat.split([grads[k].numel() for k in keys])):
            out[k] = part.view_as(grads[k])
    return out


def _wait(works) -> None:
    for work in works:
        work.wait()


def start_fleet(device_name: str, backend: str, log: Callable[[str], None]) -> Fleet:
    """Join the ranks torchrun started (one rank when not under torchrun).

    On cuda each rank takes the GPU of its LOCAL_RANK. backend auto: NCCL between GPUs, gloo on
    CPUs; NCCL asked for on CPUs falls back to gloo, with a message.
    """
    if not launched_by_torchrun():
        return Fleet()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise SlowllamaError(f"torchrun: local rank {local}, but this node has {torch.cuda.device_count()} "
                                 "GPUs (--nproc-per-node at most the number of GPUs)")
        torch.cuda.set_device(local)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        if rank == 0:
            log("--dist-backend nccl: NCCL needs GPUs and these ranks compute on the CPU; falling back to gloo")
        backend = "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise SlowllamaError("--dist-backend nccl: this torch was built without NCCL (use --device cpu)")
    if backend == "gloo" and cuda:
        raise SlowllamaError("--dist-backend gloo: the ranks compute on GPUs, whose collectives need NCCL "
                             "(use --dist-backend auto, or --device cpu)")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is a rank waiting?
    dist.init_process_group(backend, timeout=TIMEOUT)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if rank == 0:
        log(f"torchrun: {world} ranks, {backend}")
    return Fleet(rank, world, device)


def data_digest(tokens) -> str:
    """A digest of the token ids a rank trains on (ranks must agree)."""
    h = hashlib.blake2b(digest_size=16)
    for part in tokens:
        h.update(memoryview(part.contiguous().numpy() if isinstance(part, torch.Tensor) else part).cast("B"))
    return h.hexdigest()
