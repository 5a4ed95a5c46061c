"""The optimizer of finetune's settings."""

from __future__ import annotations



from slowllama.errors import SlowllamaError
from slowllama.optim.adamw import AdamW
from slowllama.optim.sgd import SGD


def make_optimizer(s) -> "SGD | AdamW":
    """The optimizer of finetune's settings."""
    from slowllama.model.args import dtype_from_name

    if s.optimizer == "sgd":
        return SGD()
    try:
        b1, b2 = (float(x) for x in str(s.adam_betas).split(","))
    except ValueError:
        raise SlowllamaError(f"--adam-betas: expected two numbers like 0.9,0.999, got {s.adam_betas!r}") from None
    return AdamW(betas=(b1, b2), eps=s.adam_eps, weight_decay=s.weight_decay,
                 state_dtype=dtype_from_name(s.optim_dtype, "--optim-dtype"))
