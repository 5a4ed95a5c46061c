"""`slowllama eval`: eval loss and perplexity over eval's windows, streaming the modules."""

from __future__ import annotations

import json
import math
from typing import Callable

from tqdm import tqdm

from slowllama.commands.common import adapter_state, check_seq_len, make_engine, resolve_device
from slowllama.commands.models import prepared_store
from slowllama.data.windows import TokenData, count_windows, eval_batches, eval_file, load_data
from slowllama.engine.chain import OffloadedModel
from slowllama.errors import SlowllamaError
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import EvalSettings
from slowllama.store.store import Store


def evaluate(engine: OffloadedModel, data: TokenData, seq_len: int, batch_size: int,
             progress: bool = True) -> dict:
    """eval_loss: mean token cross-entropy over all targets of eval's windows; eval_ppl = exp(eval_loss)."""
    n_windows = count_windows(data, seq_len)
    total, count = 0.0, 0
    batches = list(eval_batches(data, seq_len, batch_size))
    # several batches share one pass over the modules, as many as their activations fit the budget
    per_batch = eval_activation_bytes(engine.args, data, seq_len) // n_windows * batch_size
    group = max(1, min(len(batches), engine.activation_budget.limit // max(per_batch, 1)))
    with tqdm(total=n_windows, desc="eval", unit="win", disable=None if progress else True, leave=False) as bar:
        for first in range(0, len(batches), group):
            part = batches[first:first + group]
            s, c = engine.loss_sum(part)
            total, count = total + s, count + c
            bar.update(sum(x.shape[0] for x, _ in part))
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "tokens": count}


def eval_activation_bytes(args, data: TokenData, seq_len: int) -> int:
    """Hidden states of all eval windows at once (fp32, and a second copy in flight)."""
    return count_windows(data, seq_len) * seq_len * args.dim * 4 * 2


def run_eval(s: EvalSettings, log: Callable[[str], None]) -> dict:
    if not s.data:
        raise SlowllamaError("--data: required (a .txt or .jsonl file)")
    if s.batch_size < 1:
        raise SlowllamaError(f"--batch-size: must be at least 1, got {s.batch_size}")
    store = Store.open(prepared_store(s.store, log))  # a checkpoint folder or hub id: its store
    check_seq_len(s.seq_len, store.args)
    tokenizer = load_tokenizer(store.path)
    data = load_data(eval_file(s.data, log), tokenizer, s.seq_len, s.pack, s.mask_prompt, s.skip_bad_lines, log)
    engine = make_engine(store, s, lora=adapter_state(store, s, resolve_device(s)[0]), batch_size=s.batch_size,
                         seq_len=s.seq_len, activations=eval_activation_bytes(store.args, data, s.seq_len))
    return evaluate(engine, data, s.seq_len, s.batch_size)


def run(s: EvalSettings, log: Callable[[str], None]) -> None:
    result = run_eval(s, log)
    if s.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"eval_loss {result['eval_loss']:.6f}  eval_ppl {result['eval_ppl']:.4f}  tokens {result['tokens']}")
