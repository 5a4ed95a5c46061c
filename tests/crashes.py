"""Helpers of the crash tests: a small fp32 store, the whole state of a store, uninterrupted reference runs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from slowllama import cli
from slowllama.commands.finetune import finetune
from slowllama.formats.meta import export_meta, prepare_meta
from slowllama.formats.tiny import write_tiny
from slowllama.settings import FinetuneSettings
from slowllama.store.manifest import KINDS, MANIFEST
from slowllama.store.store import Store

from conftest import ALICE, FAULTS_RUNNER, run_cli

# 2 blocks: 4 modules (tok_embeddings, layers.0, layers.1, head); per step 3 forward and 4 backward
# fault points, 4 module files written (SGD) or 25 (AdamW: weights + 21 parts of state)
COMMON = ["--device", "cpu", "--steps", "3", "--batch-size", "2", "--accumulate", "2", "--seq-len", "16",
          "--dropout", "0.1", "--seed", "3", "--log-every", "0", "--eval-every", "0", "--data", str(ALICE)]


def streaming_budget(stateful: bool, ranks: int = 1) -> str:
    """--max-memory just above the working set of the module in flight (of `ranks` ranks of a torchrun): no module
    stays resident, so every step reads and writes every module and commits (the path of models larger than
    memory)."""
    from slowllama.engine.residency import working_bytes
    from slowllama.model.args import ModelArgs
    from slowllama.model.families import PRESETS
    from slowllama.optim.adamw import AdamW

    args = ModelArgs(**{**PRESETS["tiny"], "n_layers": 2, "dim": 64})
    return str(working_bytes(args, torch.float32, torch.float32, train=True, optimizer=AdamW() if stateful else None,
                             batch_size=2, seq_len=16, microbatches=2, ranks=ranks) + 300_000)


RUNS = {
    "sgd": COMMON + ["--lr", "0.05", "--max-memory", streaming_budget(False)],
    "adamw": COMMON + ["--optimizer", "adamw", "--lr", "1e-3", "--grad-clip", "0.05", "--clip-norm", "previous",
                       "--max-memory", streaming_budget(True)],
}
# one intra-op thread in every process of these tests, so that in-process and subprocess runs do the same sums
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_cache: dict = {}


def base_store(tmp_path_factory) -> Path:
    """A prepared store of a 2-block fp32 model (dim 64), built once per session; copy it before use."""
    if "base" not in _cache:
        root = tmp_path_factory.mktemp("crash-model")
        model = write_tiny(root / "model", dtype="fp32", shards=1, n_layers=2, dim=64)
        _cache["base"] = prepare_meta(model, root / "store", log=lambda m: None)
    return _cache["base"]


def fresh_store(tmp_path_factory, dest: Path) -> Path:
    shutil.copytree(base_store(tmp_path_factory), dest)
    return dest


def state(store: Path) -> dict[tuple[str, str, str], torch.Tensor]:
    """Every tensor of every file the manifest names (weights, optimizer state), checked on read."""
    s = Store.open(store)
    return {(kind, name, key): t.clone() for kind, files in s.manifest.files.items() for name in files
            for key, t in s.read(name, kind).items()}


def assert_bit_identical(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, t in expected.items():
        assert actual[key].dtype == t.dtype and torch.equal(actual[key], t), key


def exported(store: Path, out: Path) -> dict[str, torch.Tensor]:
    """The store exported to Meta's format, read back: {shard/key: tensor}."""
    export_meta(store, out, log=lambda m: None)
    return {f"{p.name}/{k}": t for p in sorted(out.glob("consolidated.*.pth"))
            for k, t in torch.load(p, weights_only=True).items()}


def settings(store: Path, args: list[str]) -> FinetuneSettings:
    """The settings `slowllama finetune STORE ARGS` runs with."""
    ns = cli.build_parser().parse_args(["finetune", str(store), *args])
    return cli.settings_from(FinetuneSettings, ns)


def in_one_thread(fn, *args, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(old)


def reference(tmp_path_factory, run: str) -> dict:
    """An uninterrupted run: the store's whole state after each step (0..3) and its export."""
    if run not in _cache:
        root = tmp_path_factory.mktemp(f"reference-{run}")
        store = fresh_store(tmp_path_factory, root / "store")
        steps = [state(store)]
        in_one_thread(finetune, settings(store, RUNS[run]), log=lambda m: None, emit=lambda m: steps.append(state(store)))
        _cache[run] = {"steps": steps, "export": exported(store, root / "export")}
    return _cache[run]


def finetune_cli(store: Path, run: str, faults: str = "", **kw):
    """`slowllama finetune` in a subprocess, with faults armed."""
    env = {**ONE_THREAD, "SLOWLLAMA_FAULTS": faults}
    return run_cli("finetune", store, *RUNS[run], env=env, module=FAULTS_RUNNER, **kw)


def resume_in_process(store: Path, run: str, capsys) -> str:
    """Run the same command again, to completion, in this process; returns its stderr."""
    capsys.readouterr()
    code = in_one_thread(cli.main, ["finetune", str(store), *RUNS[run]])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def files_on_disk(store: Path) -> set[str]:
    return {f"{kind}/{f.name}" for kind in KINDS if (store / kind).is_dir() for f in (store / kind).iterdir()}


def referenced(store: Path) -> set[str]:
    return Store.open(store).manifest.named_files()


def generation(rel: str) -> int:
    return int(re.search(r"@(\d+)(\.rows)?\.safetensors$", rel)[1])


def assert_clean(store: Path) -> None:
    """Nothing but the committed step: no leftover files, journal, temporary manifest or scratch files."""
    assert files_on_disk(store) == referenced(store)
    for name in ("journal.json", "manifest.json.tmp", "journal.json.tmp"):
        assert not (store / name).exists(), name
    assert not any((store / "scratch").glob("*")) if (store / "scratch").is_dir() else True


def committed_hash(store: Path) -> str:
    """A hash of what a store has committed: its manifest and every file it names."""
    h = hashlib.sha256((store / MANIFEST).read_bytes())
    for rel in sorted(referenced(store)):
        h.update(rel.encode() + (store / rel).read_bytes())
    return h.hexdigest()


def folder_hash(folder: Path, skip=()) -> str:
    """A hash of every file under a folder (names, contents, links), skipping top-level names in `skip`."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        dirs[:] = sorted(d for d in dirs if rel_root != "." or d not in skip)
        files = [f for f in files if rel_root != "." or f not in skip]
        for name in sorted(dirs + files):
            p = Path(root) / name
            h.update(os.path.join(rel_root, name).encode())
            if p.is_symlink():
                h.update(b"->" + os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()
