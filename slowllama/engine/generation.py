"""KV-cached generation from the offloaded model: each new token is one pass over the blocks at one position."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from slowllama.engine.chain import OffloadedModel
from slowllama.errors import SlowllamaError
from slowllama.model.layers import KVCache, rope_tables
from slowllama.model.tokenizer import Tokenizer


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set holding top_p, at least one
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs.cpu() / sorted_probs.sum().cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


@torch.no_grad()
def generate(model: OffloadedModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             on_text: Optional[Callable[[str], None]] = None, on_token: Optional[Callable[[int], None]] = None) -> str:
    """Continue `prompt`; returns the new text. on_text receives each new piece of text as it is produced,
    on_token each new token id.

    The prompt gets BOS as the tokenizer's config says (add_bos), never EOS. The new text is
    decode(prompt + new tokens) minus decode(prompt), so it keeps the space before its first word.
    """
    args = model.args
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos) or [tokenizer.bos_id]  # an empty prompt: from BOS
    if len(ids) >= args.max_seq_len:
        raise SlowllamaError(f"--prompt: {len(ids)} tokens, the model's context is {args.max_seq_len}")
    total = min(len(ids) + max_new_tokens, args.max_seq_len)
    dtype = model.cfg.compute_dtype
    caches = [KVCache(1, total, args.kv_heads, args.head_dim, dtype, model.device) for _ in range(args.n_layers)]
    generator = torch.Generator().manual_seed(seed)
    stream = tokenizer.stream(ids)
    pos, chunk = 0, ids
    while max_new_tokens > 0:
        logits = _forward(model, torch.tensor([chunk], device=model.device), pos, caches)
        pos += len(chunk)
        next_id = sample(logits[0, -1], temperature, top_p, generator)
        if next_id in tokenizer.stop_ids:  # EOS, or another end-of-turn id named by generation_config.json
            break
        if on_token:
            on_token(next_id)
        piece = stream.push(next_id)
        if on_text and piece:
            on_text(piece)
        if len(stream.new_ids) >= max_new_tokens or pos >= total:
            break
        chunk = [next_id]
    piece = stream.flush()
    if on_text and piece:
        on_text(piece)
    return stream.shown


def _forward(model: OffloadedModel, tokens: torch.Tensor, start: int, caches: list[KVCache]) -> torch.Tensor:
    """Logits of `tokens` at positions start.., updating the caches; every module streamed once."""
    cos, sin = rope_tables(model.args, start, tokens.shape[1], device=model.device)
    h = model.module("tok_embeddings")(tokens)
    for i in range(model.args.n_layers):
        h = model.module(f"layers.{i}")(h, cos, sin, start, caches[i])
    return model.logits(h[:, -1:])
