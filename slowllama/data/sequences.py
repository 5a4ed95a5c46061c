"""Records as token sequences: [BOS] + tokens + [EOS], and which positions carry loss.

BOS where the tokenizer's config adds it to text (add_bos); EOS always ends a record, so that the
model learns where a completion stops.

What carries loss: every token of a text record (and of a .txt file); the completion of a
prompt/completion record; the assistant turns of a chat (chat.py finds them), each with what the
template writes after it (end of turn) and the final EOS. --no-mask-prompt: every token.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from slowllama.data.chat import assistant_spans, chat_template, completion_spans
from slowllama.data.records import Record, read_records, read_text
from slowllama.errors import SlowllamaError
from slowllama.model.layers import IGNORE_INDEX
from slowllama.model.tokenizer import Tokenizer


class Example(NamedTuple):
    """One record as a sequence: labels before masking (the tokens) and which positions carry loss."""
    tokens: torch.Tensor  # (n,) int64
    labels: torch.Tensor  # (n,) int64
    trainable: torch.Tensor  # (n,) bool

    def masked_labels(self) -> torch.Tensor:
        return torch.where(self.trainable, self.labels, IGNORE_INDEX)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_record(record: Record, tokenizer: Tokenizer, template, mask_prompt: bool = True) -> Example:
    """A record as [BOS] + tokens + [EOS] (BOS if tokenizer.add_bos), with the completion / assistant
    positions marked trainable.

    The whole text is tokenized once (the tokens the model sees). A character offset c maps to the
    number of leading tokens that the tokenization of text[:c] shares with it, so the tokens of a
    span [a, b) are those from offset a's token to offset b's: a token straddling a span's start
    carries loss, one straddling its end does not.
    template: (render, encode, name) from chat.chat_template, used by chat records only.
    """
    encode = tokenizer.encode
    if record.kind == "text":
        text, spans = record.text, [(0, len(record.text))]
    elif record.kind == "completion":
        text, spans = completion_spans(record.prompt, record.completion)
    else:
        render, encode, _ = template
        text, spans = assistant_spans(record.messages, render, record.where)
    if not mask_prompt:
        spans = [(0, len(text))]
    ids = encode(text)

    def token_index(c: int) -> int:
        return len(ids) if c >= len(text) else _common_prefix(encode(text[:c]), ids)

    trainable = [False] * len(ids)
    for a, b in spans:
        for i in range(token_index(a), token_index(b)):
            trainable[i] = True
    # a template may write BOS / EOS itself; else add them (BOS only where the tokenizer adds it to
    # text). BOS is never a target; an added EOS is trained when the loss reaches the end of the text
    # (the model learns to stop there)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids, trainable = [tokenizer.bos_id] + ids, [False] + trainable
    if ids and ids[0] == tokenizer.bos_id:
        trainable[0] = False
    if not ids or ids[-1] != tokenizer.eos_id or len(ids) == 1:
        ids, trainable = ids + [tokenizer.eos_id], trainable + [any(b >= len(text) for _, b in spans)]
    tokens = torch.tensor(ids, dtype=torch.long)
    return Example(tokens, tokens.clone(), torch.tensor(trainable, dtype=torch.bool))


def load_examples(path: Path, tokenizer: Tokenizer, mask_prompt: bool = True, skip_bad_lines: bool = False,
                  notes: Optional[list[str]] = None) -> list[Example]:
    """A data file as sequences: a .txt file is one (every token a target), a .jsonl file one per record.

    notes receives lines for the log (what was read, skipped lines), to be shown once all checks passed.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise SlowllamaError(f"{path}: a .json file; slowllama reads JSON lines (.jsonl, one record per line) "
                             "or plain text")
    if path.suffix.lower() != ".jsonl":  # plain text: one sequence, every token a target
        tokens = torch.tensor(tokenizer.encode_text(read_text(path)), dtype=torch.long)
        return [Example(tokens, tokens.clone(), torch.ones(len(tokens), dtype=torch.bool))]
    records = read_records(path, read_text(path), skip_bad_lines, notes)
    # only chat records need a template (and jinja2, for a model's own template)
    template = chat_template(tokenizer) if any(r.kind == "chat" for r in records) else None
    examples = [tokenize_record(r, tokenizer, template, mask_prompt) for r in records]
    if notes is not None:
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(r.kind for r in records).items())
        n_tokens = sum(len(e.tokens) for e in examples)
        n_targets = sum(int(e.trainable.sum()) for e in examples)
        how = f"; chats rendered with {template[2]}" if template else ""
        notes.append(f"{path}: {len(records)} records ({kinds}), {n_tokens} tokens, {n_targets} of them with "
                     f"loss{how}")
    return examples
