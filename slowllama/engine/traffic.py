"""The bytes a training step moves, without running it: the pipeline's residency replayed on a plan of use.

`slowllama plan` asks what a step at given budgets reads from the store, writes to it and copies between
host and GPU. The answer follows from the plan of use (residency.train_plan), each key's size (from the
shapes) and the resident room the budgets leave (residency.split_budgets): keys stay resident, on the GPU
first, then in host memory, and when room is needed the one whose next use is farthest ahead goes (Belady,
as pipeline.py evicts). The plan repeats step after step, so the replay runs two cycles and counts the
second: the steady state, where the last modules of one step are still resident for the next.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional

import torch

from slowllama.engine.pipeline import Key
from slowllama.engine.residency import Budgets, train_plan
from slowllama.model.args import ModelArgs
from slowllama.model.shapes import module_names, module_shapes
from slowllama.optim.base import Optimizer
from slowllama.store.quantized import Quantization, weight_bytes
from slowllama.store.state_parts import part_module, split_piece, state_parts


@dataclass(frozen=True)
class Traffic:
    """Bytes of one steady-state step: store reads and writes (activation spills included), host <-> GPU."""

    read: int
    written: int
    h2d: int
    d2h: int
    spilled: int  # of read and written: activations beyond the budgets, through the scratch folder


def key_sizes(args: ModelArgs, store_dtype: torch.dtype, plan: list[Key], optimizer: Optional[Optimizer],
              part_elements: int, quant: Optional[Quantization] = None) -> dict[Key, int]:
    """Bytes of each key of a plan: a module's weights as stored (a piece "layers.N/<key>" is one weight; a
    quantized store's packed), a part of its optimizer state or of its fp32 master weights."""
    parts = {p.name: p for name in module_names(args)
             for p in state_parts(name, module_shapes(args, name), part_elements)}
    state = optimizer.state_bytes_per_weight if optimizer is not None else 0
    sizes = {}
    for kind, name in set(plan):
        if kind == "modules":
            module, key = split_piece(name)
            sizes[(kind, name)] = weight_bytes(args, module, key, store_dtype, quant)
        else:
            elements = math.prod(parts[name].shape)
            sizes[(kind, name)] = elements * (4 if kind == "master" else state)
    return sizes


def replay(plan: list[Key], sizes: dict[Key, int], writes: dict[int, list[Key]], device_room: int,
           host_room: int, split: bool, cycles: int = 2) -> Traffic:
    """Replay the pipeline over `cycles` repetitions of the plan and return the last one's bytes.

    writes: position in the plan -> the keys whose new versions are handed back (an update, written at once)
    after that use. device_room / host_room: resident bytes of each tier (split: the device has memory of its own,
    else only device_room counts). Reads land on the device when it has room, else in host memory; an update's
    new version goes to the device; eviction moves a device key to host memory when that has room, else
    drops it."""
    n = len(plan)
    uses: dict[Key, list[int]] = {}
    for i, key in enumerate(plan):
        uses.setdefault(key, []).append(i)
    tier: dict[Key, str] = {}
    used = {"device": 0, "host": 0}
    room = {"device": device_room, "host": host_room if split else 0}
    counts = dict(read=0, written=0, h2d=0, d2h=0)

    def distance(key: Key, pos: int) -> int:
        at = uses[key]
        i = bisect.bisect_left(at, pos)
        return at[i] - pos if i < len(at) else at[0] + n - pos

    def fit(pos: int, current: set[Key], count: bool) -> None:
        for t in ("device", "host") if split else ("device",):
            while used[t] > room[t]:
                victims = [k for k, where in tier.items() if where == t and k not in current]
                if not victims:
                    break
                victim = max(victims, key=lambda k: distance(k, pos))
                size = sizes[victim]
                used[t] -= size
                if t == "device" and split and room["host"] - used["host"] >= size:
                    tier[victim] = "host"
                    used["host"] += size
                    if count:
                        counts["d2h"] += size
                else:
                    del tier[victim]

    current: set[Key] = set()
    for cycle in range(cycles):
        count = cycle == cycles - 1
        for i, key in enumerate(plan):
            pos, size = i + 1, sizes[key]
            if not any(part_module(k[1]) == part_module(key[1]) for k in current):
                current = set()  # the pipeline keeps a module's keys (weights, state parts) until it moves on
            current.add(key)
            where = before = tier.get(key)
            if where is None:
                where = "device" if not split or room["device"] - used["device"] >= size else "host"
                tier[key] = where
                used[where] += size
                if count:
                    counts["read"] += size
                fit(pos, current, count)
            if split and count and before != "device":  # used on the device: copied there unless it was
                counts["h2d"] += size
            for done in writes.get(i, ()):
                size = sizes[done]
                if done in tier:  # the old version goes (it may have been evicted while in use)
                    used[tier.pop(done)] -= size
                tier[done] = "device"
                used["device"] += size
                current.discard(done)
                if count:
                    counts["written"] += size
                    counts["d2h"] += size if split else 0
                fit(pos, current, count)
    return Traffic(counts["read"], counts["written"], counts["h2d"], counts["d2h"], 0)


def step_traffic(args: ModelArgs, store_dtype: torch.dtype, device_type: str, budgets: Budgets, *, unit: str,
                 microbatches: int, optimizer: Optional[Optimizer], master: bool, lora: bool, deferred: bool,
                 activations: int, part_elements: int, quant: Optional[Quantization] = None) -> Traffic:
    """The bytes of one steady-state training step at `budgets` (residency.split_budgets of the run's need).

    optimizer: the one whose state the store keeps (None: none); lora: the base is frozen (nothing written,
    the embeddings not updated); deferred: the model stays resident and is written only at commit points
    (residency.fits_in_memory), so a step writes nothing. activations: bytes of the step's cached module
    inputs; those beyond the budgets' share go to the scratch folder and back (written once, read once)."""
    kinds = [] if lora else (["master"] if master else []) + (["optim"] if optimizer is not None else [])
    parts = lambda name: state_parts(name, module_shapes(args, name), part_elements)  # noqa: E731
    plan = train_plan(args, parts, kinds, embeddings_backward=not lora, unit=unit, microbatches=microbatches)
    sizes = key_sizes(args, store_dtype, plan, optimizer, part_elements, quant)
    # an update hands back each part of state at its use, and the weights after the last of their parts
    # (updates.py): at the last use of a key and the state that follows it
    last = {key: i for i, key in enumerate(plan)}
    writes: dict[int, list[Key]] = {}
    if not (lora or deferred):
        for key, i in last.items():
            if key[0] == "modules":
                while i + 1 < len(plan) and plan[i + 1][0] != "modules":
                    i += 1
            writes.setdefault(i, []).append(key)
        for keys in writes.values():  # the state's part before the weights it belongs to
            keys.sort(key=lambda k: k[0] == "modules")
    split = device_type == "cuda"  # mps: one memory (its pipeline's host tier has no budget of its own)
    traffic = replay(plan, sizes, writes, budgets.device, budgets.host if split else 0, split)
    on_host = min(max(0, activations - budgets.activations), budgets.host_activations) if split else 0
    spilled = max(0, activations - budgets.activations - (budgets.host_activations if split else 0))
    return Traffic(traffic.read + spilled, traffic.written + spilled, traffic.h2d + on_host, traffic.d2h + on_host,
                   spilled)
