"""Each weight's dtype in the checkpoint a store was prepared from, read back from its source record.

Both exports write a weight in the dtype it came in, whichever format the store was prepared from
(a Hugging Face store exported to Meta's format, and the other way round).
"""

from __future__ import annotations

import torch

from slowllama.errors import SlowllamaError
from slowllama.formats import hf_names as hf
from slowllama.model.args import dtype_from_name
from slowllama.store import safetensors_io as st
from slowllama.store.store import Store


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
