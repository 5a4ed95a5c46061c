"""`slowllama verify STORE`: check a whole store without changing it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm import tqdm

from slowllama.errors import SlowllamaError
from slowllama.memory import format_size
from slowllama.store import Store


def verify_store(path: Path, log: Callable[[str], None] = print) -> dict:
    """Check the manifest, every file it names (size, xxh3 checksum, tensor names, shapes and dtypes
    against the model args) and the folders (no links leading outside, every module present).

    Raises SlowllamaError naming the first bad file; returns a summary when all is well.
    """
    store = Store.open(path)  # the manifest: format, fields, paths inside the store, model args, dtype
    problems, leftovers = store.layout_problems()
    try:
        from slowllama.loader import export_plan

        export_plan(store)  # the source record export will read
    except SlowllamaError as e:
        problems.append(str(e))
    entries = [(kind, name) for kind, files in store.manifest["files"].items() for name in files]
    total = 0
    for kind, name in tqdm(entries, desc="verify", unit="file", disable=None, leave=False):
        try:
            store.read(name, kind)
            total += store.module_bytes(name, kind)
        except SlowllamaError as e:
            problems.append(str(e))
    if problems:
        more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise SlowllamaError(problems[0] + more)
    summary = {"store": str(store.path), "step": store.step, "files": len(entries), "bytes": total,
               "leftovers": len(leftovers)}
    note = (f"; {len(leftovers)} files left by an interrupted step are not part of it (the next finetune "
            "removes them)") if leftovers else ""
    log(f"{store.path}: step {store.step}, {len(entries)} files, {format_size(total)}: sizes, checksums, "
        f"names and shapes all match{note}")
    return summary
