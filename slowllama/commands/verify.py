"""`slowllama verify STORE`: check a whole store without changing it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from slowllama.errors import SlowllamaError
from slowllama.formats.meta import export_plan
from slowllama.settings import VerifySettings
from slowllama.sizes import format_size
from slowllama.store.adapters import AdapterFolder
from slowllama.store.manifest import KINDS, MANIFEST
from slowllama.store.quantized import packed_problems
from slowllama.store.store import OWN_PATHS, Store


def verify_store(path: Path, log: Callable[[str], None] = print) -> dict:
    """Check the manifest, every file it names (size, xxh3 checksum, tensor names, shapes and dtypes
    against the model args) and the folders (no links leading outside, every module present).

    Raises SlowllamaError naming the first bad file; returns a summary when all is well. A share of a split store:
    the files it holds, those of its own host's modules.
    """
    store = Store.open(path, share_ok=True)  # the manifest: format, fields, paths inside the store, model args, dtype
    share = store.share
    problems, leftovers = layout_problems(store)
    if store.source.format == "meta":
        try:
            export_plan(store)  # the record of the source that export reads
        except SlowllamaError as e:
            problems.append(str(e))
    entries = [(kind, name) for kind, name in store.manifest.entries()
               if share is None or share.host_of(name) in (None, share.host)]
    total = 0
    for kind, name in tqdm(entries, desc="verify", unit="file", disable=None, leave=False):
        try:
            tensors = store.read(name, kind)
            total += store.module_bytes(name, kind)
            if kind == "modules" and name in store.expected_shapes:
                problems += packed_problems(store.quantization, name, tensors, store.expected_shapes[name],
                                            str(store.path / store.file_info(name).file))
        except SlowllamaError as e:
            problems.append(str(e))
    if problems:
        more = {1: "", 2: " (and 1 more problem)"}.get(len(problems), f" (and {len(problems) - 1} more problems)")
        raise SlowllamaError(problems[0] + more)
    summary = {"store": str(store.path), "step": store.step, "files": len(entries), "bytes": total,
               "leftovers": len(leftovers)}
    if store.quantization is not None:
        summary["quantization"] = store.quantization.to_json()
    if share is not None:
        summary["share"] = {"host": share.host, "hosts": share.hosts, "ranks_per_host": share.ranks_per_host}
    note = (f"; {len(leftovers)} files left by an interrupted step are not part of it (the next finetune "
            "removes them)") if leftovers else ""
    scheme = (f"; {store.quantization.scheme} blocks" + (" (double quant)" if store.quantization.double_quant else "")
              if store.quantization else "")
    of = "" if share is None else f", the share of host {share.host} of {share.layout()}"
    log(f"{store.path}: step {store.step}{of}, {len(entries)} files, {format_size(total)}: sizes, checksums, "
        f"names and shapes all match{scheme}{note}")
    return summary


def layout_problems(store: Store) -> tuple[list[str], list[str]]:
    """What is wrong with the store's folders, and the files no manifest entry names (leftovers).

    Problems: a symbolic link among the store's own paths or module files, a module of the model
    without a file. Leftovers are files an interrupted step left; the next writable open removes them.
    """
    problems, leftovers = [], []
    for rel in OWN_PATHS:
        if (store.path / rel).is_symlink():
            problems.append(f"{store.path / rel}: a symbolic link; a store's own files must lie inside it")
    for name in store.expected_shapes:
        if not store.has(name):
            problems.append(f"{store.path / MANIFEST}: no file for module {name!r}")
    recorded = store.source.tokenizer_files
    names = ["tokenizer.model"] if recorded is None else recorded
    for name in names if isinstance(names, list) else [names]:
        path = store.path / str(name)
        if not isinstance(name, str) or Path(name).name != name or path.is_symlink() or not path.is_file():
            problems.append(f"{path}: the tokenizer file is missing, a link, or not a file of the store")
    for rel in ("lock", "scratch", "run"):
        path = store.path / rel
        if path.exists() and not path.is_symlink() and path.is_dir() != (rel != "lock"):
            problems.append(f"{path}: a {'folder' if rel == 'lock' else 'file'} where slowllama keeps its "
                            f"{'lock file' if rel == 'lock' else 'folder'}")
    referenced = store.manifest.named_files()
    for kind in KINDS:
        folder = store.path / kind
        if not folder.is_dir() or folder.is_symlink():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_symlink():
                problems.append(f"{f}: a symbolic link; module files must be plain files inside the store")
            elif f"{kind}/{f.name}" not in referenced:
                leftovers.append(str(f))
    return problems, leftovers


def verify_adapters(path: Path, log: Callable[[str], None] = print) -> dict:
    """Check an adapter folder without changing it (store/adapters.py: AdapterFolder.verify)."""
    summary = AdapterFolder(path).verify()
    log(f"{path}: adapters at step {summary['step']}, {summary['files']} files: sizes, checksums, names and "
        "shapes all match")
    return summary


def run(s: VerifySettings, log: Callable[[str], None]) -> None:
    """`slowllama verify STORE | ADAPTER_FOLDER`: the report on stdout (with --json, also the summary)."""
    path = Path(s.store)
    is_adapters = AdapterFolder(path).exists() and not (path / MANIFEST).exists()
    summary = verify_adapters(path, log=print) if is_adapters else verify_store(path, log=print)
    if s.json:
        print(json.dumps(summary), flush=True)
