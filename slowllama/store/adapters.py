"""The adapter folder of a LoRA run: the adapters, their optimizer state, the run's step, snapshots.

state.json is the folder's commit, as the manifest is a store's: a save writes adapters@S, optim@S and
the step's snapshot (under a temporary name, then renamed), then replaces state.json, which names
them with their sizes and xxh3-128 checksums; only then are the previous step's files removed and
the results for other tools refreshed: adapters.safetensors (a copy) and PEFT's adapter_model.safetensors
+ adapter_config.json (Hugging Face's names and rows, model/peft.py). Every slowllama reader goes
through state.json and checks what it reads, so a kill at any instant leaves the folder at one step;
the next finetune on the folder removes the files no state names and brings the results up to date,
and `slowllama verify` checks it all. slowllama's own config is slowllama_adapter.json (folders of
an older slowllama kept it in adapter_config.json, which they still read as such).

A folder PEFT wrote (adapter_model.safetensors + adapter_config.json alone) is read as the adapters
of step 0: eval, generate and fuse apply it, finetune continues training it (and the folder becomes
slowllama's at its first save)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.faults import fault_point
from slowllama.jsonfile import read_json
from slowllama.model import peft
from slowllama.model.args import ModelArgs
from slowllama.model.lora import LoRAConfig, init_params
from slowllama.store import safetensors_io as st
from slowllama.store.atomic import fsync_dir, write_json_atomic
from slowllama.store.destination import check_destination
from slowllama.store.lock import StoreLock
from slowllama.store.safe_files import open_new, os_error

ADAPTERS = "adapters.safetensors"


CONFIG = "slowllama_adapter.json"


PEFT_CONFIG = "adapter_config.json"  # also slowllama's own config in folders of an older slowllama


PEFT_WEIGHTS = "adapter_model.safetensors"


STATE = "state.json"


# what a run writes or reads in the folder by these names: none may be a link (it would lead the writes outside)
OWN_NAMES = (CONFIG, PEFT_CONFIG, PEFT_WEIGHTS, STATE, ADAPTERS, "settings.json", "metrics.jsonl", "loss.png", "lock",
             "scratch")
# the only names state.json may give its files (never a path: its names are read and removed)
STEP_FILE = re.compile(r"(adapters|optim)@\d+\.safetensors|\d{7}_adapters\.safetensors")
MAX_RANK = 1 << 16


class AdapterFolder:
    """The adapter folder of a LoRA run: the result, the optimizer state, the run's step, snapshots (see above)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock: Optional[StoreLock] = None
        self.bytes_written = 0

    def exists(self) -> bool:
        own = self.path / CONFIG  # (a FIFO or link there is refused when it is read)
        return own.exists() or own.is_symlink() or (self.path / PEFT_CONFIG).is_file()

    def is_peft(self) -> bool:
        """A folder PEFT wrote: adapter_config.json of PEFT's and no config of slowllama's (neither layout)."""
        own = self.path / CONFIG
        if own.exists() or own.is_symlink() or not (self.path / PEFT_CONFIG).is_file():
            return False
        c = read_json(self.path / PEFT_CONFIG)
        if isinstance(c, dict) and c.get("format") == "slowllama-lora":
            return False
        if not peft.is_peft_config(c):
            raise SlowllamaError(f"{self.path / PEFT_CONFIG}: neither a slowllama nor a PEFT adapter config "
                                 "(no peft_type)")
        return True

    def starts_from_peft(self) -> bool:
        """No step saved, and PEFT's adapters to start from: a folder PEFT wrote (or one whose first save was cut
        off before its commit)."""
        return self.is_peft() or (self.state() is None and not (self.path / ADAPTERS).exists()
                                  and (self.path / PEFT_WEIGHTS).is_file())

    def _config_path(self) -> Path:
        """slowllama's own config: slowllama_adapter.json, or in an older folder adapter_config.json."""
        own = self.path / CONFIG
        return own if own.exists() or own.is_symlink() or not (self.path / PEFT_CONFIG).exists() \
            else self.path / PEFT_CONFIG

    def open_for_training(self, log: Callable[[str], None], protected: tuple = ()) -> None:
        """Lock the folder (a new or empty one, or an adapter folder; never inside `protected`, the store) and
        finish or undo what an interrupted save left."""
        check_destination(self.path, "adapters", protected=protected, reuse=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(self.path, e, "cannot create the adapter folder") from None
        for name in OWN_NAMES:
            if (self.path / name).is_symlink():
                raise SlowllamaError(f"{self.path / name}: a symbolic link; an adapter folder's own files must lie "
                                     "inside it (remove the link)")
        self.lock = StoreLock(self.path)
        self.lock.acquire(log)
        try:
            self._recover(log)
        except BaseException:
            self.close()
            raise

    def _recover(self, log) -> None:
        """Take an older folder's config to its own file, remove what no state.json names (a save cut off before
        its commit, temporary names), and renew the results if a kill came between the commit and their copies."""
        if self._config_path().name == PEFT_CONFIG and not self.is_peft():  # the older layout
            write_json_atomic(self.path / CONFIG, self.config())
            log(f"{self.path}: slowllama's adapter config is now {CONFIG} ({PEFT_CONFIG} is PEFT's, written "
                "at the next save)")
        state = self.state()
        keep = set(state["files"].values()) | set(state.get("snapshots", [])) if state else set()
        removed = 0
        for f in self.path.iterdir():
            leftover = f.name.endswith(".tmp") or (STEP_FILE.fullmatch(f.name) and f.name not in keep
                                                    and (state is None or "snapshots" in state
                                                         or "@" in f.name))
            if leftover and not f.is_dir():  # a link is removed, never followed
                f.unlink()
                removed += 1
        if state and "checksums" in state and self._result_stale(state):
            self._refresh_result(state)
            log(f"recovered: {self.path / ADAPTERS} brought up to step {state['step']}, which state.json names")
        elif removed:
            log(f"recovered: removed {removed} files an interrupted save left in {self.path}")
        if state and "checksums" in state and (self.path / CONFIG).is_file() and self._peft_stale(state):
            self._refresh_peft(state)
            log(f"recovered: {self.path / PEFT_WEIGHTS} and {PEFT_CONFIG} brought up to step {state['step']}")

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None

    def config(self) -> dict:
        """slowllama's own config of the folder (not a PEFT folder's)."""
        path = self._config_path()
        c = read_json(path)
        if not isinstance(c, dict):
            raise SlowllamaError(f"{path}: not a slowllama adapter config (expected an object)")
        return c

    def state(self) -> Optional[dict]:
        """state.json, checked: the step, and file names that are names of this folder's step files."""
        path = self.path / STATE
        if not path.exists() and not path.is_symlink():
            return None
        state = read_json(path)
        ok = isinstance(state, dict) and isinstance(state.get("step"), int) and not isinstance(state["step"], bool) \
            and state["step"] >= 0 and isinstance(state.get("files"), dict) \
            and set(state["files"]) == {"adapters", "optim"} and isinstance(state.get("run", {}), dict) \
            and isinstance(state.get("snapshots", []), list) and isinstance(state.get("checksums", {}), dict)
        names = list(state["files"].values()) + list(state.get("snapshots", [])) if ok else []
        if not ok or not all(isinstance(n, str) and STEP_FILE.fullmatch(n) for n in names):
            raise SlowllamaError(f"{path}: not a slowllama adapter state (step, files, snapshots)")
        norm = state.get("run", {}).get("grad_norm")
        if norm is not None and (not isinstance(norm, (int, float)) or isinstance(norm, bool)
                                 or not math.isfinite(norm) or norm < 0):
            raise SlowllamaError(f"{path}: field 'run.grad_norm' must be a finite number >= 0, got {norm!r}")
        for name, entry in state.get("checksums", {}).items():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                    and not isinstance(entry[0], bool) and entry[0] >= 0 and isinstance(entry[1], str)):
                raise SlowllamaError(f"{path}: the checksum of {name!r} must be [bytes, xxh3]")
        return state

    @staticmethod
    def config_dict(cfg: LoRAConfig, args: ModelArgs, base: Optional[str]) -> dict:
        """slowllama_adapter.json; base: what PEFT's adapter_config.json names as base_model_name_or_path."""
        return {"format": "slowllama-lora", "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
                "targets": list(cfg.targets), "model": args.to_dict(), "base": base}

    def write_config(self, cfg: LoRAConfig, args: ModelArgs, base: Optional[str] = None) -> None:
        write_json_atomic(self.path / CONFIG, self.config_dict(cfg, args, base))

    def load_config(self, args: Optional[ModelArgs]) -> LoRAConfig:
        """The adapter's config, checked (and against the base model, when given); of a PEFT folder, its
        adapter_config.json (whatever slowllama cannot apply exactly refused)."""
        if self.is_peft():
            return peft.lora_config(read_json(self.path / PEFT_CONFIG), str(self.path / PEFT_CONFIG))
        c = self.config()
        where = str(self._config_path())
        try:
            cfg = LoRAConfig(c["rank"], float(c["alpha"]), float(c.get("dropout", 0.0)), tuple(c["targets"]))
        except (KeyError, TypeError, ValueError):
            raise SlowllamaError(f"{where}: not a slowllama adapter config (rank, alpha, targets)") from None
        if not isinstance(cfg.rank, int) or isinstance(cfg.rank, bool) or not 1 <= cfg.rank <= MAX_RANK \
                or not all(isinstance(t, str) for t in cfg.targets):
            raise SlowllamaError(f"{where}: field 'rank' must be an integer in [1, {MAX_RANK}], targets names, "
                                 f"got rank {cfg.rank!r}")
        try:
            cfg.validate()
        except SlowllamaError as e:  # its messages name the flags: name the file too
            raise SlowllamaError(f"{where}: {e}") from None
        base = c.get("model", {})
        if not isinstance(base, dict):
            raise SlowllamaError(f"{where}: field 'model' must be an object")
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            if args is not None and field in base and base[field] != getattr(args, field):
                raise SlowllamaError(f"{where}: the adapter is for a model with {field} {base[field]}, "
                                     f"the store has {getattr(args, field)}")
        return cfg

    def _expect(self, state: Optional[dict], name: str) -> Optional[tuple[int, str]]:
        entry = (state or {}).get("checksums", {}).get(name)
        return None if entry is None else (entry[0], entry[1])

    def _read(self, name: str, state: Optional[dict]) -> dict[str, torch.Tensor]:
        path = self.path / name
        if path.is_symlink():
            raise SlowllamaError(f"{path}: a symbolic link; an adapter folder's files must lie inside it")
        return st.read_file(str(path), expect=self._expect(state, name))

    def load_params(self, args: ModelArgs, cfg: LoRAConfig, device, name: Optional[str] = None
                    ) -> dict[str, torch.Tensor]:
        """The adapters of the last saved step (the file state.json names, checked against its checksum; in a
        folder without state.json, adapters.safetensors as it is; in a PEFT folder, adapter_model.safetensors
        in slowllama's names and rows), checked against the config's shapes."""
        if name is None and self.starts_from_peft():
            path = self.path / PEFT_WEIGHTS
            tensors = peft.from_peft(self._read(PEFT_WEIGHTS, None), args, cfg, str(path))
            return {k: v.to(device) for k, v in tensors.items()}
        state = self.state()
        if name is None:
            name = state["files"]["adapters"] if state else ADAPTERS
        path = self.path / name
        tensors = self._read(name, state)
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

    def save(self, step: int, params: dict, optim_state: dict, run: dict, snapshot: bool,
             config: Optional[dict] = None) -> None:
        """Atomically make (params, optimizer state, run) the folder's state at `step` (see the module's doc);
        config: slowllama_adapter.json, written first where it is missing (a PEFT folder's first save)."""
        if config is not None and not (self.path / CONFIG).is_file():
            write_json_atomic(self.path / CONFIG, config)
        old = self.state()
        files = {"adapters": f"adapters@{step}.safetensors", "optim": f"optim@{step}.safetensors"}
        checksums = {}
        for key, tensors in (("adapters", params), ("optim", optim_state)):
            size, digest = st.write_file(str(self.path / files[key]), {k: v.detach().cpu() for k, v in tensors.items()})
            checksums[files[key]] = [size, digest]
            self.bytes_written += size
        fault_point("lora.save.files")
        snapshots = [n for n in (old or {}).get("snapshots", []) if n in (old or {}).get("checksums", {})
                     and (self.path / n).is_file()]
        for n in snapshots:
            checksums[n] = old["checksums"][n]
        if snapshot:
            name = f"{step:07d}_{ADAPTERS}"
            self._copy(files["adapters"], name)  # complete and durable under its name before state.json names it
            snapshots = [n for n in snapshots if n != name] + [name]
            checksums[name] = checksums[files["adapters"]]
            self.bytes_written += checksums[name][0]
        write_json_atomic(self.path / STATE, {"step": step, "files": files, "snapshots": snapshots,
                                              "checksums": checksums, "run": run}, fault="lora.state")
        if old:
            for name in set(old["files"].values()) - set(files.values()):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
        fault_point("lora.save.committed")
        self._refresh_result(self.state())
        self.bytes_written += checksums[files["adapters"]][0]  # every byte the disk took
        self.bytes_written += self._refresh_peft(self.state())

    def _copy(self, src: str, dest: str) -> None:
        """Copy a file of the folder to a new name: a temporary file fsynced, then renamed."""
        tmp = self.path / (dest + ".tmp")
        data = (self.path / src).read_bytes()
        with open_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("lora.save.copy")
        os.replace(tmp, self.path / dest)
        fsync_dir(self.path)

    def _result_stale(self, state: dict) -> bool:
        try:
            st.read_file(str(self.path / ADAPTERS), expect=self._expect(state, state["files"]["adapters"]))
        except SlowllamaError:
            return True
        return (self.path / ADAPTERS).is_symlink()

    def _refresh_result(self, state: dict) -> None:
        """adapters.safetensors: a copy of the adapters state.json names (for other tools)."""
        self._read(state["files"]["adapters"], state)  # checked before it is copied
        self._copy(state["files"]["adapters"], ADAPTERS)

    def _peft_files(self, state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """What adapter_config.json and adapter_model.safetensors hold at the step state.json names."""
        c = self.config()
        cfg = self.load_config(None)
        try:
            args = ModelArgs.from_dict(c.get("model")).validate(str(self._config_path()))
        except (TypeError, AttributeError) as e:
            raise SlowllamaError(f"{self._config_path()}: bad model args ({e})") from None
        base = c.get("base") if isinstance(c.get("base"), str) else None
        params = self.load_params(args, cfg, "cpu", state["files"]["adapters"])
        return peft.config_dict(cfg, base), peft.to_peft(params, args, cfg)

    def _peft_stale(self, state: dict) -> bool:
        config, tensors = self._peft_files(state)
        try:
            on_disk = st.read_file(str(self.path / PEFT_WEIGHTS))
            written = read_json(self.path / PEFT_CONFIG)
        except SlowllamaError:
            return True
        return (written != config or list(on_disk) != list(tensors) or (self.path / PEFT_WEIGHTS).is_symlink()
                or not all(torch.equal(on_disk[k], t) for k, t in tensors.items()))

    def _refresh_peft(self, state: dict) -> int:
        """PEFT's adapter_model.safetensors and adapter_config.json of the step state.json names (each written
        to a temporary name, fsynced, renamed); returns the bytes written."""
        config, tensors = self._peft_files(state)
        tmp = self.path / (PEFT_WEIGHTS + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        size, _ = st.write_file(str(tmp), tensors, metadata={"format": "pt"})
        fault_point("lora.save.peft")
        os.replace(tmp, self.path / PEFT_WEIGHTS)
        write_json_atomic(self.path / PEFT_CONFIG, config)
        fsync_dir(self.path)
        return size

    def load_training_state(self, device) -> tuple[int, dict, dict, dict]:
        """(step, adapter params, optimizer state, run record) of the last save, every file checked."""
        state = self.state()
        params = {k: v.float().to(device) for k, v in self._read(state["files"]["adapters"], state).items()}
        optim = {k: v.to(device) for k, v in self._read(state["files"]["optim"], state).items()}
        return int(state["step"]), params, optim, state.get("run", {})

    def verify(self) -> dict:
        """Check the whole folder without changing it: the config, state.json, every file it names (size,
        checksum, the adapters' names and shapes against the config's model), adapters.safetensors and
        PEFT's files."""
        if self.is_peft():
            raise SlowllamaError(f"{self.path}: a PEFT adapter folder (no {CONFIG}); slowllama verifies the folders "
                                 "it writes (eval --adapter-path checks a PEFT folder against a store)")
        cfg = self.load_config(None)
        model = self.config().get("model")
        try:
            args = ModelArgs.from_dict(model).validate(str(self._config_path()))
        except TypeError as e:
            raise SlowllamaError(f"{self.path / CONFIG}: bad model args ({e})") from None
        state = self.state()
        if state is None:
            raise SlowllamaError(f"{self.path / STATE}: missing (no step of this folder was saved)")
        missing = [n for n in [*state["files"].values(), *state.get("snapshots", [])]
                   if n not in state.get("checksums", {})]
        if missing:
            raise SlowllamaError(f"{self.path / STATE}: no checksum for {missing[0]!r} (written by an older slowllama)")
        self.load_params(args, cfg, "cpu")
        self._read(state["files"]["optim"], state)
        for name in state.get("snapshots", []):
            self.load_params(args, cfg, "cpu", name)
        if self._result_stale(state):
            raise SlowllamaError(f"{self.path / ADAPTERS}: not the adapters of step {state['step']} that state.json "
                                 "names (altered, or a save was cut off: the next finetune on the folder renews it)")
        files = 3 + len(state.get("snapshots", []))
        if (self.path / CONFIG).is_file():  # an older folder has no PEFT files until its next save
            if self._peft_stale(state):
                raise SlowllamaError(f"{self.path / PEFT_WEIGHTS}: it or {PEFT_CONFIG} is not the adapters of step "
                                     f"{state['step']} that state.json names (altered, or a save was cut off: the "
                                     "next finetune on the folder renews them)")
            files += 2
        return {"adapters": str(self.path), "step": state["step"], "files": files}
