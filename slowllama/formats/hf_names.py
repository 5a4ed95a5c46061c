"""Hugging Face Llama / Mistral <-> Meta: key names, the q/k rotary layout, config.json <-> ModelArgs. No I/O.

Names: tables, dict in / dict out, an error naming any key they don't know.
Rotary layout: the rows of wq and wk are reordered within each head (model/rotary_rows.py).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.families import ARCHITECTURES, LLAMA, HFArchitecture
from slowllama.model.layers import rope_scaling_of
from slowllama.model.rotary_rows import rotary_to_hf, rotary_to_meta  # noqa: F401 (also this module's API)

ROPE_TYPES = ("default", "llama3")  # rope scaling types the model implements

GLOBAL_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_META = {  # relative to model.layers.N. / layers.N.
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GLOBAL_TO_HF = {v: k for k, v in GLOBAL_TO_META.items()}
LAYER_TO_HF = {v: k for k, v in LAYER_TO_META.items()}
# buffers that older transformers versions saved with the weights: kept verbatim, never used
HF_EXTRA_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_META_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_hf_extra(hf_key: str) -> bool:
    return bool(HF_EXTRA_RE.match(hf_key))


def meta_key(hf_key: str, n_layers: int) -> Optional[str]:
    """The Meta name of a Hugging Face weight (None: not a weight of this model)."""
    if hf_key in GLOBAL_TO_META:
        return GLOBAL_TO_META[hf_key]
    m = _HF_LAYER_RE.match(hf_key)
    if m and int(m[1]) < n_layers and m[2] in LAYER_TO_META and str(int(m[1])) == m[1]:
        return f"layers.{m[1]}.{LAYER_TO_META[m[2]]}"
    return None


def hf_key(meta: str) -> str:
    """The Hugging Face name of a Meta weight."""
    if meta in GLOBAL_TO_HF:
        return GLOBAL_TO_HF[meta]
    m = _META_LAYER_RE.match(meta)
    if m and m[2] in LAYER_TO_HF:
        return f"model.layers.{m[1]}.{LAYER_TO_HF[m[2]]}"
    raise SlowllamaError(f"no Hugging Face name for the weight {meta!r}")


def _rotary_heads(meta: str, args: ModelArgs) -> Optional[int]:
    """How many heads a weight's rows hold if they carry rotary positions (wq, wk), else None."""
    if meta.endswith("attention.wq.weight"):
        return args.n_heads
    if meta.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def tensor_to_meta(meta: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = _rotary_heads(meta, args)
    return rotary_to_meta(t, heads) if heads else t


def tensor_to_hf(meta: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = _rotary_heads(meta, args)
    return rotary_to_hf(t, heads) if heads else t


def hf_to_meta(sd: dict[str, torch.Tensor], args: ModelArgs, where: str = "state dict") -> dict[str, torch.Tensor]:
    """A Hugging Face state dict -> Meta's names and rotary layout (extras like inv_freq are dropped)."""
    out = {}
    for key, t in sd.items():
        meta = meta_key(key, args.n_layers)
        if meta is None:
            if is_hf_extra(key):
                continue
            raise SlowllamaError(f"{where}: unexpected key {key!r}")
        out[meta] = tensor_to_meta(meta, t, args)
    return out


def meta_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs, where: str = "state dict") -> dict[str, torch.Tensor]:
    """A Meta state dict -> Hugging Face's names and rotary layout (Meta's rope.freqs is dropped)."""
    out = {}
    for key, t in sd.items():
        if key == "rope.freqs":
            continue
        try:
            out[hf_key(key)] = tensor_to_hf(key, t, args)
        except SlowllamaError:
            raise SlowllamaError(f"{where}: unexpected key {key!r}") from None
    return out


def hf_order(args: ModelArgs) -> list[str]:
    """Meta names of the weights in the order of transformers' state dict."""
    keys = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        keys += [f"layers.{i}.{k}" for k in LAYER_TO_HF]
    keys.append("norm.weight")
    if not args.tie_word_embeddings:
        keys.append("output.weight")
    return keys


# ---- config.json <-> ModelArgs ---------------------------------------------------------------------

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def architecture_of(config: dict, where: str = "config.json") -> HFArchitecture:
    """The architecture a config.json names in `architectures` (or else in model_type); anything else is
    refused."""
    archs = config.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise SlowllamaError(f"{where}: field 'architectures' must be a list of one name, got {archs!r}")
        if archs[0] not in ARCHITECTURES:
            raise SlowllamaError(f"{where}: architecture {archs[0]!r} is not supported "
                                 f"(supported: {', '.join(ARCHITECTURES)})")
        return ARCHITECTURES[archs[0]]
    model_type = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if arch.model_type == model_type:
            return arch
    raise SlowllamaError(f"{where}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(arch.model_type for arch in ARCHITECTURES.values())})")


def rope_of(config: dict, where: str = "config.json") -> tuple[float, Optional[dict]]:
    """rope_theta and the rope scaling dict, from transformers 4's rope_theta / rope_scaling fields or
    transformers 5's rope_parameters. The scaling comes back normalized: {"rope_type": "llama3", ...} or None."""
    params = config.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise SlowllamaError(f"{where}: field 'rope_parameters' must be an object")
    scaling = params if params is not None else config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise SlowllamaError(f"{where}: field 'rope_scaling' must be an object or null")
    theta = (params or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise SlowllamaError(f"{where}: field 'rope_theta' must be a positive number, got {theta!r}")
    if not scaling:
        return float(theta), None
    field = "rope_parameters" if params is not None else "rope_scaling"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise SlowllamaError(f"{where}: rope scaling type {rope_type!r} in {field!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None
    out = {"rope_type": "llama3"}
    for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = scaling.get(name)
        if value is None and name == "original_max_position_embeddings":
            value = config.get("max_position_embeddings")  # what transformers falls back to
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise SlowllamaError(f"{where}: {field}.{name} must be a positive number, got {value!r}")
        out[name] = value
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise SlowllamaError(f"{where}: {field}.high_freq_factor must be above low_freq_factor")
    return float(theta), out


def args_from_config(config: dict, where: str = "config.json") -> tuple[ModelArgs, list[str]]:
    """ModelArgs of a LlamaForCausalLM / MistralForCausalLM config.json, and notes worth telling the user.

    Mistral's sliding_window: the engine attends over the whole context, which is the same thing for
    sequences up to the window; a window shorter than max_position_embeddings (Mistral 7B v0.1: 4096 of
    32768) therefore becomes the model's max_seq_len, so no longer sequence is ever run.
    """
    if not isinstance(config, dict):
        raise SlowllamaError(f"{where}: expected a JSON object")
    arch = architecture_of(config, where)
    c = {**arch.defaults, **{k: v for k, v in config.items() if v is not None or k == "sliding_window"}}
    for name in REQUIRED:
        if name not in c:
            raise SlowllamaError(f"{where}: field {name!r} missing")
    for name in REQUIRED + ("max_position_embeddings",):
        if not isinstance(c[name], int) or isinstance(c[name], bool) or c[name] < 1:
            raise SlowllamaError(f"{where}: field {name!r} must be a positive integer, got {c[name]!r}")
    if c["hidden_act"] != "silu":
        raise SlowllamaError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if c.get(name):
            raise SlowllamaError(f"{where}: {name} true is not supported (Llama and Mistral have no biases)")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim * c["num_attention_heads"] != c["hidden_size"]:
        raise SlowllamaError(f"{where}: head_dim {head_dim} is not hidden_size / num_attention_heads "
                             f"({c['hidden_size']} / {c['num_attention_heads']}), which this model requires")
    if not isinstance(c["tie_word_embeddings"], bool):
        raise SlowllamaError(f"{where}: field 'tie_word_embeddings' must be true or false")
    theta, scaling = rope_of(config, where)
    kv = c.get("num_key_value_heads", c["num_attention_heads"])
    args = ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                     n_kv_heads=kv, vocab_size=c["vocab_size"], norm_eps=c["rms_norm_eps"], rope_theta=theta,
                     max_seq_len=c["max_position_embeddings"], hidden_dim_override=c["intermediate_size"],
                     rope_scaling=scaling, tie_word_embeddings=c["tie_word_embeddings"])
    notes = []
    window = c.get("sliding_window") if arch.sliding_window else None
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise SlowllamaError(f"{where}: field 'sliding_window' must be a positive integer or null, got {window!r}")
        if window < args.max_seq_len:
            notes.append(f"{where}: sliding_window {window} < max_position_embeddings {args.max_seq_len}; "
                         f"slowllama attends over whole sequences, which equals sliding-window attention up to "
                         f"{window} tokens, so the store's max_seq_len is {window}")
            args.max_seq_len = window
    try:
        return args.validate(where), notes
    except SlowllamaError as e:  # said in config.json's names
        message = str(e)
        for meta, hf_name in META_TO_CONFIG.items():
            message = message.replace(f"'{meta}'", f"'{hf_name}'")
        raise SlowllamaError(message) from None


# ModelArgs' fields by the config.json names they come from (messages name the field of the file)
META_TO_CONFIG = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
                  "max_seq_len": "max_position_embeddings", "hidden_dim_override": "intermediate_size"}


def config_from_args(args: ModelArgs, torch_dtype: str, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    """A LlamaForCausalLM config.json for a model that has none (a store prepared from Meta's format)."""
    return {
        "architectures": [LLAMA.name],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "initializer_range": 0.02,
        "intermediate_size": args.hidden_dim,
        "max_position_embeddings": args.max_seq_len,
        "mlp_bias": False,
        "model_type": LLAMA.model_type,
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.norm_eps,
        "rope_scaling": rope_scaling_dict(args),
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def rope_scaling_dict(args: ModelArgs) -> Optional[dict]:
    """config.json's rope_scaling of a model: a copy of its llama3 scaling, or None."""
    scaling = rope_scaling_of(args)
    return {**scaling} if scaling else None
