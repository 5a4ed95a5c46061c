"""Optimizer state and master weights in parts: row ranges of one weight, one store file each.

A 7B block's AdamW moments are 1.6 GB (a Llama 3 embedding's, 4.2 GB): read and written whole,
they would make the memory a module in flight needs several times its weights'. In parts of at
most `max_elements` elements (rows of one weight, in order), an update streams them instead: the
next part is read while one part is updated, and each part is written as soon as it is done.

A part is named `<module>#<index>`; its file holds, for rows [start, stop) of the module's weight
`key`, the optimizer's state tensors `<key>.<name>` as the optimizer declares them (AdamW:
`<key>.exp_avg`, `<key>.exp_avg_sq`, and the module's `step`), or `<key>` (master weights).
The split follows from the shapes and the store's manifest field `state_part_elements`, so every
reader of a store finds the same parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_PART_ELEMENTS = 1 << 25  # 32 Mi elements: 256 MiB of fp32 AdamW moments


@dataclass(frozen=True)
class StatePart:
    module: str
    index: int
    key: str  # the weight, Meta's name inside the module
    start: int  # rows [start, stop) of the weight (its first dimension)
    stop: int
    weight_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.module}#{self.index}"

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.weight_shape[1:])


def state_parts(module: str, shapes: dict[str, tuple[int, ...]], max_elements: int) -> list[StatePart]:
    """The parts of a module's state: each weight (in the module's order) cut into even row ranges of at
    most max_elements elements (at least one row each)."""
    parts: list[StatePart] = []
    for key, shape in shapes.items():
        rows, per_row = shape[0], math.prod(shape[1:])
        count = math.ceil(rows / max(1, max_elements // max(per_row, 1)))
        step = math.ceil(rows / count)  # even parts
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            parts.append(StatePart(module, len(parts), key, start, stop, tuple(shape)))
    return parts


def part_module(name: str) -> str:
    """The module a store name belongs to: 'layers.3#4' -> 'layers.3' (a module's own name is itself)."""
    return name.split("#", 1)[0]


PIECE = "/"  # 'layers.3/feed_forward.w1.weight': one weight of a module, read and written on its own


def piece_name(module: str, key: str) -> str:
    return f"{module}{PIECE}{key}"


def split_piece(name: str) -> tuple[str, "str | None"]:
    """('layers.3', 'feed_forward.w1.weight') of a piece's name; (name, None) of anything else."""
    module, sep, key = name.partition(PIECE)
    return (module, key) if sep else (name, None)
