"""The dtypes of a conversion, for Meta's and Hugging Face's converters alike: the store's (from --dtype or
the source's), and each weight's in the checkpoint a store was prepared from (what export writes back)."""

from __future__ import annotations

from typing import Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.formats import hf_names as hf
from slowllama.model.args import dtype_from_name
from slowllama.store import safetensors_io as st
from slowllama.store.store import Store


def resolve_store_dtype(dtype: Optional[str], source_dtype: torch.dtype, where: str) -> torch.dtype:
    """The store's dtype: --dtype if given, else the source's; only fp32, bf16 and fp16 are kept."""
    store_dtype = dtype_from_name(dtype, "--dtype") if dtype else source_dtype
    if store_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SlowllamaError(f"{where}: weights of dtype {source_dtype} are not supported (use --dtype)")
    return store_dtype


def source_dtypes(store: Store) -> dict[str, torch.dtype]:
    """Each weight's dtype in the source checkpoint, by HF key (the store's dtype where unknown)."""
    source = store.source
    recorded = source.layout
    out = {}
    if source.format == "hf":
        for layout in recorded.get("shards", []):
            for key, d, _ in layout["keys"]:
                out[key] = st.TORCH_DTYPES.get(d, store.dtype)
    elif recorded.get("shards"):  # Meta: every shard holds every key
        for key, d, _ in recorded["shards"][0]["keys"]:
            try:
                out[hf.hf_key(key)] = dtype_from_name(d)
            except SlowllamaError:  # rope.freqs: not a weight, not in HF's format
                continue
    return out
