"""A store split across hosts by owner: each host's share holds the whole manifest and the files of its own ranks'
modules only.

A share is a store folder whose manifest has a `share` record: how many hosts and ranks per host the split was made
for, which host this share is, and the owner table (module -> rank index host * ranks_per_host + local rank,
engine/owners.py's table for that many ranks). The manifests of the shares of one store at one step are the same
except for `share.host` (every module's entries are in each, so that shapes, steps and the run are known
everywhere); `digest` tells whether two are. commands/shares.py splits a whole store into shares and joins them
again; a share alone is not a store that eval, generate or export read (Store.open refuses it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slowllama.errors import SlowllamaError
from slowllama.model.shapes import module_names
from slowllama.store.manifest import JOURNAL, MANIFEST, Manifest
from slowllama.store.state_parts import part_module

FIELD = "share"  # the manifest's field
PREPARED = "manifest.prepared.json"  # a share's next manifest, written in phase 1 of a commit across hosts
# top-level files of a store that are its state, not its content (never copied from one store into another)
NOT_CONTENT = (MANIFEST, JOURNAL, "lock", PREPARED)


@dataclass(frozen=True)
class ShareRecord:
    """What a share's manifest says of the split: hosts x ranks_per_host ranks, this share's host, the owners."""

    hosts: int
    ranks_per_host: int
    host: int
    owners: dict  # module -> rank index (host * ranks_per_host + local rank)

    @property
    def world(self) -> int:
        return self.hosts * self.ranks_per_host

    def host_of(self, module: str) -> Optional[int]:
        """The host whose share holds a module (or a part of its state); None: every share holds it (extras)."""
        rank = self.owners.get(part_module(module))
        return None if rank is None else rank // self.ranks_per_host

    def layout(self) -> str:
        return f"{self.hosts} hosts x {self.ranks_per_host} rank{'s' if self.ranks_per_host > 1 else ''}"

    def to_json(self) -> dict:
        return {"hosts": self.hosts, "ranks_per_host": self.ranks_per_host, "host": self.host,
                "owners": dict(self.owners)}

    @classmethod
    def from_json(cls, value, where: str, modules: list[str]) -> "ShareRecord":
        """The record, checked against the model's modules (a manifest edited by hand: one line naming it)."""
        def count(key, low):
            v = value.get(key) if isinstance(value, dict) else None
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise SlowllamaError(f"{where}: field '{FIELD}.{key}' must be an integer >= {low}, got {v!r}")
            return v

        hosts, per = count("hosts", 1), count("ranks_per_host", 1)
        host = count("host", 0)
        owners = value.get("owners")
        if host >= hosts:
            raise SlowllamaError(f"{where}: field '{FIELD}.host' is {host}, of {hosts} hosts")
        if not isinstance(owners, dict) or set(owners) != set(modules) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r < hosts * per for r in owners.values()):
            raise SlowllamaError(f"{where}: field '{FIELD}.owners' must give each module of the model a rank "
                                 f"below {hosts * per}")
        return cls(hosts, per, host, dict(owners))


def share_of(manifest: Manifest, where: str) -> Optional[ShareRecord]:
    """The share record of a store's manifest; None for a whole store."""
    value = manifest.extra.get(FIELD)
    return None if value is None else ShareRecord.from_json(value, where, module_names(manifest.args))


def digest(manifest_json: dict) -> str:
    """A digest of a manifest without the share's host: equal for the shares of one store at one step."""
    m = dict(manifest_json)
    if isinstance(m.get(FIELD), dict):
        m[FIELD] = {k: v for k, v in m[FIELD].items() if k != "host"}
    return hashlib.blake2b(json.dumps(m, sort_keys=True).encode(), digest_size=16).hexdigest()


def recovery(states: list[tuple[int, Optional[int]]]) -> str:
    """How the shares recover from a commit across hosts cut off: states, per host, (committed step, prepared
    step or None). "forward": make the prepared manifests current (some host committed the step, or every host
    prepared it: every host's files of that step are durable); "back": remove them (the step's files then go, as
    after any interrupted step); "" : nothing to do. A state no commit leaves: SlowllamaError."""
    committed = {c for c, _ in states}
    prepared = {p for _, p in states if p is not None}
    top = max(committed)
    if len(committed) > 2 or (len(committed) == 2 and min(committed) != top - 1):
        raise SlowllamaError(f"the shares are at steps {', '.join(str(c) for c, _ in states)} (host by host): "
                             "not shares of one store at one step")
    if len(committed) == 2:  # some host made step top current: every host had prepared it (phase 2 follows acks)
        behind = [p for c, p in states if c != top]
        if any(p != top for p in behind):
            raise SlowllamaError(f"a host committed step {top}, and another host is at step {top - 1} without "
                                 "having prepared it: not shares of one store")
        return "forward"
    if not prepared:
        return ""
    if prepared != {top + 1}:
        raise SlowllamaError(f"a share prepared step {max(prepared)} at step {top}: not a commit of these shares")
    return "forward" if all(p == top + 1 for _, p in states) else "back"


def content_files(store: Path) -> list[str]:
    """The top-level files of a store besides its manifest and state: the tokenizer, config.json ..."""
    return sorted(p.name for p in Path(store).iterdir()
                  if p.is_file() and not p.is_symlink() and p.name not in NOT_CONTENT and not p.name.endswith(".tmp"))


def read_share(path: Path) -> tuple[Manifest, ShareRecord]:
    """The manifest and share record of a share's folder (a whole store is refused)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise SlowllamaError(f"{path}: not a slowllama store (no {MANIFEST})")
    manifest = Manifest.read(path)
    record = share_of(manifest, str(path / MANIFEST))
    if record is None:
        raise SlowllamaError(f"{path}: a whole store, not a share of a split one")
    return manifest, record
