"""A finetune across hosts on the shares of a split store (store/shares.py): every rank is given its host's share.

At start (a collective, before any module is read): every rank's share must be of the split this torchrun world
is (hosts x ranks per host, each host's share on as many ranks); each host's lowest rank opens its share for
writing and the hosts agree how to finish a commit across hosts that was cut off (store/shares.recovery); then
the shares must be of one store at one step and hold the files of their own ranks' modules. Ranks are placed by
their share, not by torchrun's node rank (a c10d rendezvous numbers the nodes as they join): the ranks holding
host h's share are that host's ranks, in the order of their global ranks. Commits: train/checkpoints.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slowllama.engine.fleet import Fleet
from slowllama.errors import SlowllamaError
from slowllama.store.manifest import Manifest
from slowllama.store.shares import JOURNAL, ShareRecord, digest, recovery, share_of
from slowllama.store.store import Store


class ShareRefused(SlowllamaError):
    """Shares that do not fit the run: every rank finds the same, rank 0 says it."""


@dataclass(frozen=True)
class HostLayout:
    """Where the ranks are: the host (share) of each rank; a host's lowest rank writes its share's manifest."""

    hosts: tuple[int, ...]  # rank -> host

    def leader(self, rank: int) -> int:
        return min(r for r, h in enumerate(self.hosts) if h == self.hosts[rank])

    def leads(self, rank: int) -> bool:
        return self.leader(rank) == rank


def _verdict(everyone: list) -> None:
    """Raise the first failure of a gathered (status, detail) per rank, the same on every rank."""
    failed = [detail for status, detail in everyone if status == "failed"]
    if failed:
        raise ShareRefused(failed[0])


def placed(records: list[Optional[dict]], world: int) -> tuple[ShareRecord, HostLayout, dict[str, int]]:
    """The split the ranks' shares describe, checked against the world: (the record of rank 0's share, where each
    rank is, {module: global rank}). records: each rank's share record as JSON (None: a whole store)."""
    whole = [r for r, rec in enumerate(records) if rec is None]
    if whole:
        other = next(r for r, rec in enumerate(records) if rec is not None)
        raise ShareRefused(f"rank {whole[0]} was given a whole store and rank {other} a share of a split one "
                           "(give every rank its host's share, or every rank the whole store)")
    shares = [ShareRecord(rec["hosts"], rec["ranks_per_host"], rec["host"], rec["owners"]) for rec in records]
    for rank, share in enumerate(shares):
        if (share.hosts, share.ranks_per_host, share.owners) != (shares[0].hosts, shares[0].ranks_per_host,
                                                                 shares[0].owners):
            raise ShareRefused(f"rank {rank} was given a share of another split ({share.layout()}) than rank 0 "
                               f"({shares[0].layout()})")
    split = shares[0]
    if world != split.world:
        raise ShareRefused(f"the shares were made for {split.layout()} ({split.world} ranks), and this run has "
                           f"{world} (torchrun --nnodes {split.hosts} --nproc-per-node {split.ranks_per_host})")
    by_host = {h: [r for r, s in enumerate(shares) if s.host == h] for h in range(split.hosts)}
    for host, ranks in by_host.items():
        if len(ranks) != split.ranks_per_host:
            given = ", ".join(f"host {h}'s to {len(rs)}" for h, rs in by_host.items())
            raise ShareRefused(f"each host's share must be given to {split.ranks_per_host} rank"
                               f"{'s' if split.ranks_per_host > 1 else ''} (one host's ranks), and were: {given}")
    owners = {m: by_host[i // split.ranks_per_host][i % split.ranks_per_host] for m, i in split.owners.items()}
    return split, HostLayout(tuple(s.host for s in shares)), owners


def missing_files(store: Store) -> Optional[str]:
    """The first file of its own ranks' modules (or of every share's: extras) that a share lacks, or None."""
    share = store.share
    for kind, entries in store.manifest.files.items():
        for name, entry in entries.items():
            if share.host_of(name) not in (None, share.host):
                continue
            for f in (entry, *entry.rows):
                path = store.path / f.file
                if not path.is_file() or path.stat().st_size != f.bytes:
                    return f"{path}: missing or of another size ({kind} {name}, which this share's ranks own)"
    return None


def open_share(fleet: Fleet, path: Optional[Path], lora: bool, log, problem: Optional[BaseException] = None,
               ) -> Optional[tuple[Store, HostLayout]]:
    """Open this rank's share of a split store (a collective: every rank calls it); None when the ranks were given
    whole stores. Sets fleet.owners to the split's table. Full fine-tuning: each host's lowest rank holds its
    share's lock and journal, the others write their modules' files into it (co-writers). problem: why this rank
    has no store (told to the others, and raised on every rank)."""
    try:
        if problem is not None:
            raise SlowllamaError(str(problem))
        record = share_of(Manifest.read(path), str(Path(path) / "manifest.json")) if (
            Path(path) / "manifest.json").is_file() else None
        mine = ("ok", None if record is None else record.to_json())
    except SlowllamaError as e:
        mine = ("failed", str(e))
    everyone = fleet.gather_objects(mine)
    _verdict(everyone)
    records = [rec for _, rec in everyone]
    if all(rec is None for rec in records):
        return None
    split, layout, owners = placed(records, fleet.world)
    leads = layout.leads(fleet.rank)
    host = layout.hosts[fleet.rank]
    store, state = None, ("ok", None)
    try:
        if leads:  # (LoRA: read-only; refused while a finetune writes the share)
            store = Store.open(path, writable=not lora, log=log, share_ok=True, recover=False)
            if lora and (store.prepared_step() is not None or (store.path / JOURNAL).exists()):
                raise SlowllamaError(f"{path}: a step of a full fine-tuning was cut off; run that finetune again "
                                     "to recover the shares first")
            state = ("ok", (store.step, store.prepared_step()))
    except SlowllamaError as e:
        state = ("failed", f"host {host}: {e}")
    try:
        states = fleet.gather_objects(state)
        _verdict(states)
        leaders = {layout.hosts[r]: r for r in range(fleet.world) if layout.leads(r)}
        try:
            how = recovery([states[leaders[h]][1] for h in sorted(leaders)])
        except SlowllamaError as e:
            raise ShareRefused(str(e)) from None
        result, said = ("ok", None), []
        if leads:
            try:
                if not lora:
                    store.recover_share(how == "forward", said.append)
                lacking = missing_files(store)
                result = ("failed", lacking) if lacking else ("ok", (store.step, digest(store.manifest.to_json())))
            except SlowllamaError as e:
                result = ("failed", f"host {host}: {e}")
        gathered = fleet.gather_objects((result, said))
        results = [r for r, _ in gathered]
        for h, r in sorted(leaders.items()):  # what each host's recovery did, said once by rank 0
            for line in gathered[r][1]:
                log(f"host {h}'s share: {line}")
        _verdict(results)
        steps = {h: results[r][1] for h, r in leaders.items()}
        if len({d for _, d in steps.values()}) > 1:
            at = ", ".join(f"host {h} at step {s}" for h, (s, _) in sorted(steps.items()))
            raise ShareRefused(f"the shares are not of one store at one step ({at}; their manifests differ)")
        fleet.barrier()  # the co-writers open the share once its writer has recovered it
        sight = ("ok", None)
        if not leads:
            try:
                store = Store.open(path, follower=True, co_writer=not lora, share_ok=True)
            except SlowllamaError as e:
                sight = ("failed", f"rank {fleet.rank}: {e}")
        pids = fleet.gather_objects(os.getpid())
        if sight[0] == "ok" and not (leads or lora or store.locked_by(pids[layout.leader(fleet.rank)])):
            sight = ("failed", f"rank {fleet.rank} was given host {host}'s share, but not the very folder that rank "
                               f"{layout.leader(fleet.rank)} (that host's first rank) locked: a host's ranks share "
                               "one share folder")
        _verdict(fleet.gather_objects(sight))
    except BaseException:
        if store is not None:
            store.close()
        raise
    fleet.owners, fleet.shared_store = owners, True
    if fleet.main:
        log(f"{path}: the share of host {host} of a store split across {split.layout()}; each host's ranks "
            "read, update and write the modules of their share")
    return store, layout
