"""The adapter folder of a LoRA run: the adapters, their optimizer state, the run's step, snapshots.

A save writes adapters@S / optim@S files, then state.json (atomically) naming them; only then
are the previous ones removed and adapters.safetensors refreshed. So a kill at any instant
leaves the folder at one step."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.jsonfile import read_json
from slowllama.model.args import ModelArgs
from slowllama.model.lora import LoRAConfig, init_params
from slowllama.store import safetensors_io as st
from slowllama.store.atomic import write_json_atomic
from slowllama.store.lock import StoreLock

ADAPTERS = "adapters.safetensors"


CONFIG = "adapter_config.json"


STATE = "state.json"


class AdapterFolder:
    """The adapter folder of a LoRA run: the result, the optimizer state, the run's step, snapshots.

    A save writes adapters@S / optim@S files, then state.json (atomically) naming them; only then
    are the previous ones removed and adapters.safetensors refreshed. So a kill at any instant
    leaves the folder at one step.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock: Optional[StoreLock] = None
        self.bytes_written = 0

    def exists(self) -> bool:
        return (self.path / CONFIG).is_file()

    def open_for_training(self, log) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = StoreLock(self.path)
        self.lock.acquire(log)
        state = self.state()
        keep = set(state.get("files", {}).values()) if state else set()
        for f in self.path.glob("*@*.safetensors"):  # leftovers of an interrupted save
            if f.name not in keep:
                f.unlink()

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None

    def config(self) -> dict:
        return read_json(self.path / CONFIG)

    def state(self) -> Optional[dict]:
        return read_json(self.path / STATE) if (self.path / STATE).is_file() else None

    def write_config(self, cfg: LoRAConfig, args: ModelArgs) -> None:
        write_json_atomic(self.path / CONFIG, {"format": "slowllama-lora", "rank": cfg.rank, "alpha": cfg.alpha,
                                               "dropout": cfg.dropout, "targets": list(cfg.targets),
                                               "model": args.to_dict()})

    def load_config(self, args: ModelArgs) -> LoRAConfig:
        """The adapter's config, checked against the base model."""
        c = self.config()
        where = str(self.path / CONFIG)
        try:
            cfg = LoRAConfig(int(c["rank"]), float(c["alpha"]), float(c.get("dropout", 0.0)), tuple(c["targets"]))
        except (KeyError, TypeError, ValueError):
            raise SlowllamaError(f"{where}: not a slowllama adapter config (rank, alpha, targets)") from None
        cfg.validate()
        base = c.get("model", {})
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            if field in base and base[field] != getattr(args, field):
                raise SlowllamaError(f"{where}: the adapter is for a model with {field} {base[field]}, "
                                     f"the store has {getattr(args, field)}")
        return cfg

    def load_params(self, args: ModelArgs, cfg: LoRAConfig, device, name: str = ADAPTERS) -> dict[str, torch.Tensor]:
        path = self.path / name
        tensors = st.read_file(str(path))
        expected = init_params(args, cfg, 0, "meta")
        for key, t in expected.items():
            if key not in tensors:
                raise SlowllamaError(f"{path}: missing adapter {key!r} (rank, targets or layers don't match)")
            if tuple(tensors[key].shape) != tuple(t.shape):
                raise SlowllamaError(f"{path}: adapter {key!r} has shape {list(tensors[key].shape)}, the store's "
                                     f"model needs {list(t.shape)}")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise SlowllamaError(f"{path}: unexpected adapter {extra[0]!r}")
        return {k: tensors[k].float().to(device) for k in expected}

    def save(self, step: int, params: dict, optim_state: dict, run: dict, snapshot: bool) -> None:
        """Atomically make (params, optimizer state, run) the folder's state at `step`."""
        old = self.state()
        files = {"adapters": f"adapters@{step}.safetensors", "optim": f"optim@{step}.safetensors"}
        for key, tensors in (("adapters", params), ("optim", optim_state)):
            size, _ = st.write_file(str(self.path / files[key]), {k: v.detach().cpu() for k, v in tensors.items()})
            self.bytes_written += size
        write_json_atomic(self.path / STATE, {"step": step, "files": files, "run": run})
        if old:
            for name in set(old.get("files", {}).values()) - set(files.values()):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
        # the plain result file users load, refreshed by copy + rename
        tmp = self.path / (ADAPTERS + ".tmp")
        shutil.copyfile(self.path / files["adapters"], tmp)
        os.replace(tmp, self.path / ADAPTERS)
        copies = 2 if snapshot else 1
        if snapshot:
            shutil.copyfile(self.path / files["adapters"], self.path / f"{step:07d}_{ADAPTERS}")
        self.bytes_written += copies * (self.path / ADAPTERS).stat().st_size  # every byte the disk took

    def load_training_state(self, device) -> tuple[int, dict, dict, dict]:
        """(step, adapter params, optimizer state, run record) of the last save."""
        state = self.state()
        params = {k: v.float().to(device) for k, v in st.read_file(str(self.path / state["files"]["adapters"])).items()}
        optim = {k: v.to(device) for k, v in st.read_file(str(self.path / state["files"]["optim"])).items()}
        return int(state["step"]), params, optim, state.get("run", {})
