"""Which rank owns which module (several ranks): the owner alone reads it, keeps its optimizer state, updates and
writes it. A pure function of the module sizes and the number of ranks, so every rank works out the same table."""

from __future__ import annotations


def assign_owners(sizes: list[tuple[str, int]], world: int) -> dict[str, int]:
    """{module: rank} for modules in forward order with their bytes (weights and optimizer state alike).

    Greedy in module order: each module goes to the rank holding the fewest bytes so far (ties: the lowest rank).
    With equal blocks this is round-robin, so neighbouring blocks mostly have different owners and their updates
    run on different ranks; the shares differ by at most one module's bytes.
    """
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    load = [0] * world
    owners = {}
    for name, size in sizes:
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += size
    return owners
