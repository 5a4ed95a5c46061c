"""Models where users have them: a store, a Meta or Hugging Face folder (prepared once into a store
beside it), or a Hugging Face id `org/name` found in the local Hugging Face cache (never downloaded)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

from slowllama.errors import SlowllamaError
from slowllama.formats.convert import prepare
from slowllama.store.manifest import MANIFEST

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def is_hub_id(text: str) -> bool:
    """org/name that is not a path on this machine."""
    return bool(HUB_ID.fullmatch(text)) and not Path(text).exists()


def hub_snapshot(repo_id: str) -> Path:
    """The folder of repo_id's snapshot in the cache: the revision refs/main points to, else the only one,
    else the newest. An error naming the cache path when it is not there."""
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    hint = f"slowllama does not download models: `huggingface-cli download {repo_id}` first"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        raise SlowllamaError(f"{repo_id}: no such folder, and not in the Hugging Face cache ({repo} not found; "
                             f"{hint})")
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        snap = snapshots / ref.read_text().strip()
    else:
        found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SlowllamaError(f"{repo_id}: {snapshots} holds no snapshot ({hint})")
        snap = found[-1]
    if not (snap / "config.json").exists():
        raise SlowllamaError(f"{snap}: no config.json: the cached {repo_id} is not a complete model ({hint})")
    return snap


def is_checkpoint_folder(path: Path) -> bool:
    """A Meta or Hugging Face folder (not a store)."""
    return path.is_dir() and not (path / MANIFEST).exists() and (
        (path / "params.json").exists() or (path / "config.json").exists())


def store_path(model: str) -> tuple[Path, Optional[Path]]:
    """(the store for MODEL, the checkpoint folder it is prepared from, or None when MODEL is a store).

    A folder's store is FOLDER-store beside it; a hub id's is NAME-store in the current folder."""
    path = Path(model).expanduser()
    if is_checkpoint_folder(path):
        return path.parent / f"{path.name}-store", path
    if is_hub_id(model):
        snap = hub_snapshot(model)
        return Path(f"{model.split('/')[1]}-store"), snap
    return path, None


def prepared_store(model: str, log: Callable[[str], None]) -> Path:
    """The store for MODEL (store_path), prepared first if it is not there yet; says which in one line."""
    store, source = store_path(model)
    if source is not None:
        what = model if source == Path(model).expanduser() else f"{model} (in the Hugging Face cache: {source})"
        if (store / MANIFEST).exists():
            log(f"{what}: using its store {store}, prepared from it before")
        else:
            log(f"{what}: preparing it once into the store {store}")
            prepare(source, store, log=log)
    return store
