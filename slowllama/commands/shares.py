"""`slowllama split` and `slowllama join`: a whole store into shares for several hosts, each holding the files of its
own ranks' modules (store/shares.py), and the shares back into one whole store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from slowllama.engine.owners import assign_owners
from slowllama.errors import SlowllamaError
from slowllama.model.shapes import module_names
from slowllama.settings import JoinSettings, SplitSettings
from slowllama.store import safetensors_io as st
from slowllama.store.atomic import fsync_dir, staged_folder, write_json_atomic
from slowllama.store.destination import check_destination
from slowllama.store.lock import StoreLock
from slowllama.store.manifest import MANIFEST
from slowllama.store.shares import FIELD, JOURNAL, PREPARED, ShareRecord, content_files, digest, read_share
from slowllama.store.store import Store


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    st.fsync_file(str(dest))


def _copy_run_folder(src: Path, dest: Path) -> None:
    if (src / "run").is_dir() and not (src / "run").is_symlink():
        for p in sorted((src / "run").iterdir()):
            if p.is_file() and not p.is_symlink():
                _copy(p, dest / "run" / p.name)


def split(store_path: Path, out: Path, hosts: int, ranks_per_host: int = 1, log: Callable[[str], None] = print,
          host: Optional[int] = None) -> list[Path]:
    """Write OUT/host-0 ... OUT/host-{hosts-1}, the shares of a whole store for that many hosts of ranks_per_host
    ranks each (the files copied; the store left as it is), or only OUT/host-{host}. Returns the shares' paths."""
    if hosts < 2:
        raise SlowllamaError(f"--hosts: a split needs at least 2 hosts, got {hosts}")
    if ranks_per_host < 1:
        raise SlowllamaError(f"--nproc-per-node: must be at least 1, got {ranks_per_host}")
    if host is not None and not 0 <= host < hosts:
        raise SlowllamaError(f"--host: a host of 0 ... {hosts - 1}, got {host}")
    out = Path(out)
    written = Path(out) if host is None else Path(out) / f"host-{host}"  # (one host's: beside the others' shares)
    if written.exists() or written.is_symlink():
        raise SlowllamaError(f"{written}: already exists (give a new folder for the shares)")
    check_destination(written, "store", protected=(store_path,))
    with Store.open(store_path) as store:  # refuses a share, and a store a finetune is writing
        if (store.path / JOURNAL).exists():
            raise SlowllamaError(f"{store.path}: a step of a run was cut off ({JOURNAL}); run that finetune again "
                                 "(it recovers the store first), then split it")
        if any(name in store.expected_shapes for kind in ("optim", "master")
               for name in store.manifest.files.get(kind, {})):
            raise SlowllamaError(f"{store.path}: optimizer state in the layout before parts; a finetune on the store "
                                 "rewrites it in parts first, then split it")
        names = module_names(store.args)
        owners = assign_owners([(n, store.module_bytes(n)) for n in names], hosts * ranks_per_host)
        manifest = store.manifest.to_json()
        files = [(kind, name, f) for kind, entries in store.manifest.files.items() for name, entry in entries.items()
                 for f in entry.files()]
        written.parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(written) as tmp:
            paths = []
            for h in range(hosts) if host is None else [host]:
                record = ShareRecord(hosts, ranks_per_host, h, owners)
                share = tmp / f"host-{h}" if host is None else tmp
                share.mkdir(exist_ok=True)
                for kind, name, rel in files:
                    if record.host_of(name) in (None, h):
                        _copy(store.path / rel, share / rel)
                for name in content_files(store.path):
                    _copy(store.path / name, share / name)
                _copy_run_folder(store.path, share)
                for folder in [share, *(p for p in share.iterdir() if p.is_dir())]:
                    fsync_dir(folder)
                write_json_atomic(share / MANIFEST, {**manifest, FIELD: record.to_json()})
                paths.append(out / f"host-{h}")
    mine = {h: sum(1 for n in names if record.host_of(n) == h) for h in range(hosts)}
    log(f"split {store_path} for {record.layout()}: "
        + ", ".join(f"{p} {mine[int(p.name.split('-')[1])]} modules" for p in paths))
    return paths


def join(shares: list[Path], out: Path, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Gather the shares of one store at one step into a whole store at OUT (the shares left as they are)."""
    shares = [Path(p) for p in shares]
    read = [read_share(p) for p in shares]
    first_manifest, first = read[0]
    for path, (manifest, record) in zip(shares, read):
        StoreLock(path).refuse_if_written()
        for name in (JOURNAL, PREPARED):
            if (path / name).exists():
                raise SlowllamaError(f"{path}: a step of a run was cut off ({name}); run the same finetune on the "
                                     "shares again to recover them, then join")
        if (record.hosts, record.ranks_per_host) != (first.hosts, first.ranks_per_host) or \
                digest(manifest.to_json()) != digest(first_manifest.to_json()):
            what = f"step {manifest.step}, {record.layout()}"
            raise SlowllamaError(f"{path}: not a share of the store {shares[0]} is a share of ({what}; "
                                 f"{shares[0]}: step {first_manifest.step}, {first.layout()})")
    by_host = {}
    for path, (_, record) in zip(shares, read):
        if record.host in by_host:
            raise SlowllamaError(f"{path}: the share of host {record.host}, as {by_host[record.host]} is")
        by_host[record.host] = path
    missing = [h for h in range(first.hosts) if h not in by_host]
    if missing:
        raise SlowllamaError(f"SHARES: the share of host {missing[0]} of {first.hosts} is missing")
    out = check_destination(Path(out), "store", force, protected=shares)
    whole = {k: v for k, v in first_manifest.to_json().items() if k != FIELD}
    # rank 0's logs: the share whose run folder has the most metrics lines
    logs = max(shares, key=lambda p: (len((p / "run" / "metrics.jsonl").read_bytes().splitlines())
                                      if (p / "run" / "metrics.jsonl").is_file() else -1, -shares.index(p)))
    with staged_folder(out) as tmp:
        for kind, entries in first_manifest.files.items():
            for name, entry in entries.items():
                holder = first.host_of(name) or 0  # (None: every share holds it; take host 0's)
                src = by_host[holder]
                for rel in entry.files():
                    if not (src / rel).is_file():
                        raise SlowllamaError(f"{src / rel}: missing (the share of host {holder} holds {kind} {name})")
                    _copy(src / rel, tmp / rel)
        for name in content_files(by_host[0]):
            _copy(by_host[0] / name, tmp / name)
        _copy_run_folder(logs, tmp)
        for folder in [tmp, *(p for p in tmp.iterdir() if p.is_dir())]:
            fsync_dir(folder)
        write_json_atomic(tmp / MANIFEST, whole)
        Store.open(tmp).close()  # the tokenizer and side files check out
    log(f"joined {len(shares)} shares into {out} (step {first_manifest.step})")
    return out


def run_split(s: SplitSettings, log: Callable[[str], None]) -> None:
    paths = split(Path(s.store), Path(s.out), s.hosts, s.nproc_per_node, log, s.host)
    log(f"each host trains its own share: torchrun --nnodes {s.hosts} --nproc-per-node {s.nproc_per_node} ... "
        f"-m slowllama finetune SHARE (one of {', '.join(p.name for p in paths)} on each host)")


def run_join(s: JoinSettings, log: Callable[[str], None]) -> None:
    shares = [p for p in s.shares.split(",") if p]
    if len(shares) < 2:
        raise SlowllamaError(f"SHARES: give every share, separated by commas (got {s.shares!r})")
    join(shares, Path(s.out), s.force, log)
