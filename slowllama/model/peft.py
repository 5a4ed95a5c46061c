"""PEFT's LoRA layout <-> slowllama's: adapter_config.json's fields and adapter_model.safetensors' names. No I/O.

PEFT on transformers' LlamaForCausalLM names the adapters of block N's q_proj
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (A: (r, in)) and `...lora_B.weight`
(B: (out, r)), and adds (lora_alpha / r) · B A to the weight, as slowllama does. transformers' q_proj
and k_proj rows are Meta's wq / wk rows reordered (model/rotary_rows.py); the update's rows follow
the weight's, so B of wq / wk is reordered the same way and A is unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.lora import HF_TARGETS, TARGETS, LoRAConfig
from slowllama.model.rotary_rows import rotary_to_hf, rotary_to_meta
from slowllama.model.shapes import linear_shape

PREFIX = "base_model.model.model.layers"
META_TO_HF = {v: k for k, v in HF_TARGETS.items()}
HF_PATHS = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
# fields a LoRA adapter_config.json may hold whatever their value: bookkeeping, or how PEFT initialized the weights
IGNORED = {"peft_version", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
           "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config",
           "megatron_core", "qalora_group_size", "layers_pattern", "ensure_weight_tying", "peft_type", "r",
           "lora_alpha", "lora_dropout", "target_modules", "bias"}
MAX_RANK = 1 << 16


def config_dict(cfg: LoRAConfig, base: Optional[str]) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA of LlamaForCausalLM (the fields every PEFT >= 0.9 knows)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "modules_to_save": None,
            "peft_type": "LORA", "r": cfg.rank, "rank_pattern": {}, "revision": None,
            "target_modules": sorted(META_TO_HF[t] for t in cfg.targets), "task_type": "CAUSAL_LM",
            "use_dora": False, "use_rslora": False}


def is_peft_config(c) -> bool:
    return isinstance(c, dict) and "peft_type" in c


def _number(c: dict, key: str, where: str) -> float:
    v = c.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise SlowllamaError(f"{where}: field {key!r} must be a number, got {v!r}")
    return float(v)


def _targets(value, where: str) -> tuple[str, ...]:
    """target_modules: names (or suffixes like 'self_attn.q_proj') of transformers' block linears, or 'all-linear'."""
    if value == "all-linear":  # PEFT: every linear but the output layer
        return tuple(TARGETS)
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise SlowllamaError(f"{where}: field 'target_modules' must be a list of module names (a regular expression "
                             f"is not supported), got {value!r}")
    out = []
    for t in value:
        leaf = t.rpartition(".")[2]
        if leaf not in HF_TARGETS or t not in (leaf, HF_PATHS[HF_TARGETS[leaf]]):
            raise SlowllamaError(f"{where}: target module {t!r} is not supported (slowllama adapts "
                                 f"{', '.join(HF_TARGETS)})")
        out.append(HF_TARGETS[leaf])
    return tuple(t for t in TARGETS if t in out)


def lora_config(c: dict, where: str) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter_config.json; whatever slowllama cannot apply exactly is refused in one line."""
    if c.get("peft_type") != "LORA":
        raise SlowllamaError(f"{where}: peft_type {c.get('peft_type')!r} is not supported (only 'LORA')")
    rank = c.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise SlowllamaError(f"{where}: field 'r' must be an integer in [1, {MAX_RANK}], got {rank!r}")
    if c.get("bias", "none") != "none":
        raise SlowllamaError(f"{where}: bias {c['bias']!r} is not supported (only 'none': Llama has no biases)")
    init = c.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # PiSSA, OLoRA, LoftQ...: the adapter goes with a changed base
        raise SlowllamaError(f"{where}: init_lora_weights {init!r} is not supported (it changes the base weights; "
                             "convert the adapter to a plain LoRA with PEFT first)")
    for key, value in c.items():
        if key not in IGNORED and value not in (None, False, {}, [], ""):
            raise SlowllamaError(f"{where}: field {key!r} = {value!r} is not supported (slowllama's LoRA is plain: "
                                 "W + (lora_alpha / r) B A on whole target modules)")
    alpha = _number(c, "lora_alpha", where)
    dropout = _number(c, "lora_dropout", where) if c.get("lora_dropout") is not None else 0.0
    cfg = LoRAConfig(rank, alpha, dropout, _targets(c.get("target_modules"), where))
    try:
        return cfg.validate()
    except SlowllamaError as e:  # its messages name the flags: say the file's field
        raise SlowllamaError(f"{where}: {str(e).replace('--lora-', 'lora_')}") from None


def _rotary_heads(target: str, args: ModelArgs) -> Optional[int]:
    return {"wq": args.n_heads, "wk": args.kv_heads}.get(target)


def peft_name(layer: int, target: str, which: str) -> str:
    """PEFT's name of slowllama's layers.N.<path>.lora_a / lora_b."""
    return f"{PREFIX}.{layer}.{HF_PATHS[target]}.lora_{which.upper()}.weight"


def to_peft(params: dict[str, torch.Tensor], args: ModelArgs, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """slowllama's adapters (Meta names and rows) -> adapter_model.safetensors' tensors, in PEFT's order."""
    out = {}
    for i in range(args.n_layers):
        for t in sorted(cfg.targets, key=lambda t: HF_PATHS[t]):
            a, b = params[f"layers.{i}.{TARGETS[t]}.lora_a"], params[f"layers.{i}.{TARGETS[t]}.lora_b"]
            heads = _rotary_heads(t, args)
            out[peft_name(i, t, "a")] = a.detach().float().cpu().contiguous()
            out[peft_name(i, t, "b")] = (rotary_to_hf(b.detach().float().cpu(), heads) if heads
                                         else b.detach().float().cpu().contiguous())
    return out


def from_peft(tensors: dict[str, torch.Tensor], args: ModelArgs, cfg: LoRAConfig, where: str
              ) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors' tensors -> slowllama's adapters (fp32), every name and shape checked against
    the store's model."""
    out, names = {}, set()
    for i in range(args.n_layers):
        for t in cfg.targets:
            out_f, in_f = linear_shape(args, t)
            for which, shape in (("a", (cfg.rank, in_f)), ("b", (out_f, cfg.rank))):
                name = peft_name(i, t, which)
                names.add(name)
                if name not in tensors:
                    raise SlowllamaError(f"{where}: missing tensor {name!r} (target_modules, layers or names don't "
                                         "match the store's model)")
                x = tensors[name]
                if tuple(x.shape) != shape:
                    raise SlowllamaError(f"{where}: tensor {name!r} has shape {list(x.shape)}, the store's model "
                                         f"needs {list(shape)} (an adapter of another model?)")
                if not x.is_floating_point():
                    raise SlowllamaError(f"{where}: tensor {name!r} has dtype {x.dtype}, expected a float")
                x = x.float()
                heads = _rotary_heads(t, args)
                out[f"layers.{i}.{TARGETS[t]}.lora_{which}"] = rotary_to_meta(x, heads) if heads and which == "b" \
                    else x
    extra = sorted(set(tensors) - names)
    if extra:
        raise SlowllamaError(f"{where}: unexpected tensor {extra[0]!r} (not an adapter of a target module of the "
                             f"store's {args.n_layers} layers)")
    return out
