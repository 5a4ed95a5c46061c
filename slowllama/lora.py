"""LoRA adapters on an offloaded, read-only base: y = W x + (alpha / rank) · B A dropout(x).

The base store is only read. The adapters of every block stay resident on the device and are
trained with AdamW; the adapter folder holds adapters.safetensors + adapter_config.json (the
result), the optimizer state and a small state.json that makes each save atomic, and numbered
snapshots. `fuse` writes W + (alpha / rank) · B A back into a full model.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slowllama import safetensors_io as st
from slowllama.config import ModelArgs, read_json
from slowllama.errors import SlowllamaError
from slowllama.store import StoreLock, write_json_atomic

TARGETS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
           "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
ADAPTERS = "adapters.safetensors"
CONFIG = "adapter_config.json"
STATE = "state.json"


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoRAConfig":
        if self.rank < 1:
            raise SlowllamaError(f"--lora-rank: must be at least 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise SlowllamaError(f"--lora-alpha: must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise SlowllamaError(f"--lora-dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise SlowllamaError(f"--lora-targets: unknown target {unknown[0] if unknown else '(none)'!r} "
                                 f"(choose from {','.join(TARGETS)})")
        return self


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b = a, b  # (rank, in), (out, rank): shared with the resident Adapters
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scale * low


def _child(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return module.get_submodule(parent), leaf


def inject(block: nn.Module, params: dict[str, torch.Tensor], cfg: LoRAConfig) -> nn.Module:
    """Replace the target linears of a transformer block with LoRALinear around the given A, B."""
    for t in cfg.targets:
        path = TARGETS[t]
        parent, leaf = _child(block, path)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), params[f"{path}.lora_a"],
                                         params[f"{path}.lora_b"], cfg.scale, cfg.dropout))
    return block


def init_params(args: ModelArgs, cfg: LoRAConfig, seed: int, device) -> dict[str, torch.Tensor]:
    """A ~ kaiming-uniform (as nn.Linear's default init), B = 0: the adapted model starts as the base."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"attention.wq": (args.n_heads * args.head_dim, args.dim),
              "attention.wk": (args.kv_heads * args.head_dim, args.dim),
              "attention.wv": (args.kv_heads * args.head_dim, args.dim),
              "attention.wo": (args.dim, args.n_heads * args.head_dim),
              "feed_forward.w1": (args.hidden_dim, args.dim), "feed_forward.w3": (args.hidden_dim, args.dim),
              "feed_forward.w2": (args.dim, args.hidden_dim)}
    params = {}
    for i in range(args.n_layers):
        for t in cfg.targets:
            out_f, in_f = shapes[TARGETS[t]]
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
            a = (torch.rand(cfg.rank, in_f, generator=g) * 2 - 1) * bound
            params[f"layers.{i}.{TARGETS[t]}.lora_a"] = a.to(device)
            params[f"layers.{i}.{TARGETS[t]}.lora_b"] = torch.zeros(out_f, cfg.rank, device=device)
    return params


def block_params(params: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    prefix = block + "."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


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


def merged_module(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor], cfg: LoRAConfig,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A block's weights with W + scale · B A merged in (fp32 arithmetic), in `dtype`."""
    out = dict(tensors)
    for t in cfg.targets:
        key = f"{TARGETS[t]}.weight"
        a, b = params[f"{TARGETS[t]}.lora_a"].float(), params[f"{TARGETS[t]}.lora_b"].float()
        out[key] = (tensors[key].float() + cfg.scale * (b @ a)).to(dtype)
    return out


def lora_settings_dict(cfg: LoRAConfig) -> dict:
    return asdict(cfg)


def fuse(store_path: Path, out: Path, adapter_path: Path, shards: Optional[int] = None, dtype: Optional[str] = None,
         force: bool = False, log=print) -> Path:
    """Write the base model with the adapters merged in (W + scale · B A), in the source's format.

    The merged modules go to a temporary store beside OUT (unchanged modules are hard-linked), which
    is exported like any store and then removed.
    """
    from slowllama.loader import export
    from slowllama.model import module_names
    from slowllama.store import Store, StoreBuilder, check_free_space

    store = Store.open(store_path)
    out = Path(out)
    if out.exists() and not force:
        raise SlowllamaError(f"{out}: already exists (use --force to replace it)")
    folder = AdapterFolder(Path(adapter_path))
    if not folder.exists():
        raise SlowllamaError(f"{folder.path}: no adapter_config.json (not a slowllama adapter folder)")
    cfg = folder.load_config(store.args)
    params = folder.load_params(store.args, cfg, "cpu")
    blocks = [n for n in module_names(store.args) if n.startswith("layers.")]
    check_free_space(out.parent, sum(store.module_bytes(n) for n in blocks), str(out))
    tmp = out.with_name(f".{out.name}.fused-{os.getpid()}")
    builder = StoreBuilder(tmp, force=True)
    try:
        for name in store.manifest["files"]["modules"]:
            if name in blocks:
                builder.write_module(name, merged_module(store.read(name), block_params(params, name), cfg,
                                                         store.dtype))
            else:
                builder.link_module(name, store)
        source = store.manifest.get("source") or {}
        for f in list(source.get("files") or []) + list(source.get("tokenizer_files") or ["tokenizer.model"]):
            if (store.path / f).exists():  # config.json, tokenizer files...: what export copies from a store
                builder.copy_file(store.path / f, f)
        manifest = {k: v for k, v in store.manifest.items() if k not in ("files", "step", "run", "format", "version")}
        fused = builder.finish(manifest)
        return export(fused, out, shards=shards, dtype=dtype, force=force, log=log)
    finally:
        builder.abort()
        shutil.rmtree(tmp, ignore_errors=True)
