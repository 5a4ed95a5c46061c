"""Check that slowllama's offloaded backward pass equals plain in-memory autograd.

    python test_backprop.py [STORE] [device]

Copies STORE (default: a tiny random model built in a temp folder) to fp32, runs 3 SGD steps
offloaded (dropout 0.1, 2 microbatches per step) and the same 3 steps in memory with autograd and
torch.optim.SGD, and prints the largest relative difference of any weight. Exits 1 above 1e-5.
"""

import sys
import tempfile
from pathlib import Path

import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.formats.meta import export_meta, prepare_meta
from slowllama.formats.tiny import DEFAULT_TEXT, write_tiny
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.testing.reference import load_transformer, max_relative_difference, store_state_dict, train_in_memory

STEPS, BATCH, ACCUMULATE, SEQ, LR, DROPOUT = 3, 2, 2, 64, 0.05, 0.1


def main(source=None, device="cpu") -> int:
    quiet = lambda m: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if source is None:
            meta = write_tiny(tmp / "tiny", dtype="fp32")
        else:
            meta = export_meta(Path(source), tmp / "meta", log=quiet)
        store = prepare_meta(meta, tmp / "store", dtype="fp32", log=quiet)
        model = load_transformer(store, dropout=DROPOUT)
        data = load_text(DEFAULT_TEXT, load_tokenizer(store))
        settings = FinetuneSettings(store=str(store), data=str(DEFAULT_TEXT), steps=STEPS, batch_size=BATCH,
                                    accumulate=ACCUMULATE, seq_len=SEQ, lr=LR, dropout=DROPOUT, device=device,
                                    compute_dtype="fp32", eval_every=0, log_every=0)
        finetune(settings, log=quiet, emit=quiet)
        train_in_memory(model, data, STEPS, BATCH, ACCUMULATE, SEQ, LR, dropout=True)
        diffs = max_relative_difference(store_state_dict(store), model.state_dict())
    worst = max(diffs, key=diffs.get)
    print(f"{len(diffs)} tensors after {STEPS} SGD steps (dropout {DROPOUT}, {ACCUMULATE} microbatches of {BATCH}): "
          f"largest relative difference {diffs[worst]:.2e} ({worst})")
    return 0 if diffs[worst] <= 1e-5 else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2] if len(sys.argv) > 2 else "cpu"))
