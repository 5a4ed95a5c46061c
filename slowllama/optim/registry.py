"""Every optimizer of this folder, found by name: a new optimizer is one new file here (and its tests).

A file defines a subclass of base.Optimizer with a `name`; its dataclass fields are the
hyperparameters it takes (betas, eps, weight_decay, state_dtype), each with its default.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Optional

import torch

import slowllama.optim
from slowllama.optim.base import Optimizer

_SUPPORT = {"base", "registry", "rounding", "schedule"}  # the folder's modules that are not optimizers
for _module in pkgutil.iter_modules(slowllama.optim.__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"slowllama.optim.{_module.name}")
OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in Optimizer.__subclasses__()}


def optimizer_names() -> list[str]:
    """The names --optimizer takes: full fine-tuning's default (sgd) first, then the others alphabetically."""
    return sorted(OPTIMIZERS, key=lambda name: (name != "sgd", name))


def optimizers_help() -> str:
    """What --optimizer's help says of each optimizer: 'name: summary; ...'."""
    return "; ".join(f"{name}: {OPTIMIZERS[name].summary}" for name in optimizer_names())


def make_optimizer(name: str, *, betas: Optional[tuple[float, float]] = None, eps: Optional[float] = None,
                   weight_decay: Optional[float] = None, state_dtype: Optional[torch.dtype] = None) -> Optimizer:
    """The optimizer `name` with those of the hyperparameters it takes (None: its default)."""
    cls = OPTIMIZERS[name]
    given = {"betas": betas, "eps": eps, "weight_decay": weight_decay, "state_dtype": state_dtype}
    takes = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in takes and v is not None})
