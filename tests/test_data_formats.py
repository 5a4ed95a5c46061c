"""Training data: JSONL records, prompt masking, chat templates, packing and padding, validation splits."""

import json
import math

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.sequences import load_examples
from slowllama.data.windows import (count_windows, eval_batches, load_train_val, pack, pad, split_indices, step_windows,
                                    window)
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.errors import SlowllamaError
from slowllama.formats.meta import prepare_meta
from slowllama.model.layers import IGNORE_INDEX, cross_entropy_sum
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.store.store import Store
from slowllama.train.checkpoints import StoreCheckpoint
from slowllama.train.trainer import Trainer

from conftest import ALICE, REPO
from reference import assert_state_close, meta_model, store_state_dict, train_in_memory

SAMSUM = REPO / "test_data" / "samsum_mini.jsonl"
SAMSUM_CHAT = REPO / "test_data" / "samsum_mini_chat.jsonl"
quiet = lambda m: None  # noqa: E731

# Llama 2 chat's template as published in its tokenizer_config.json (a format fact)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


@pytest.fixture(scope="module")
def tok(tiny_fp32):
    return load_tokenizer(tiny_fp32)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in a bool vector."""
    out, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def test_prompt_completion_loss_is_on_the_completion_and_eos(tok):
    examples = load_examples(SAMSUM, tok)
    assert len(examples) == 12
    for e, r in zip(examples, records(SAMSUM)):
        assert e.tokens[0] == tok.bos_id and e.tokens[-1] == tok.eos_id
        assert runs(e.trainable) == [(runs(e.trainable)[0][0], len(e.tokens))]  # one run, to the end
        assert tok.decode(e.tokens[e.trainable][:-1].tolist()) == r["completion"]
        assert tok.decode(e.tokens[~e.trainable].tolist()) == r["prompt"]
        labels = e.masked_labels()
        assert (labels[~e.trainable] == IGNORE_INDEX).all() and (labels[e.trainable] == e.tokens[e.trainable]).all()
    # --no-mask-prompt: every position but BOS (never a target) carries loss
    for e in load_examples(SAMSUM, tok, mask_prompt=False):
        assert not e.trainable[0] and e.trainable[1:].all()


def test_plain_chat_template_trains_every_assistant_turn(tok):
    examples = load_examples(SAMSUM_CHAT, tok)
    for e, r in zip(examples, records(SAMSUM_CHAT)):
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        spans = runs(e.trainable)
        assert len(spans) == len(answers)
        for (a, b), answer in zip(spans, answers):
            text = tok.decode(e.tokens[a:b].tolist())
            assert text == answer, (text, answer)
            assert tok.decode(e.tokens[:a].tolist()).endswith("Assistant:")
        assert spans[-1][1] == len(e.tokens)  # the final EOS is trained
        assert int((e.tokens == tok.bos_id).sum()) == 1
    assert len(runs(examples[-1].trainable)) == 2  # the multi-turn record


def test_the_models_chat_template_is_used_with_its_special_tokens(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", LLAMA2_TEMPLATE, raising=False)
    notes = []
    examples = load_examples(SAMSUM_CHAT, tok, notes=notes)
    assert "the model's chat template" in notes[-1]
    for e, r in zip(examples, records(SAMSUM_CHAT)):
        users = [m for m in r["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        # "<s>" and "</s>" written by the template are the BOS / EOS ids, once per turn, no BOS added twice
        assert e.tokens[0] == tok.bos_id
        assert int((e.tokens == tok.bos_id).sum()) == len(users)
        assert int((e.tokens == tok.eos_id).sum()) == len(answers)
        spans = runs(e.trainable)
        assert len(spans) == len(answers)
        for (a, b), answer in zip(spans, answers):
            assert e.tokens[b - 1] == tok.eos_id  # the template's own end of turn carries loss
            assert tok.decode(e.tokens[a:b - 1].tolist()).strip() == answer
            assert tok.decode(e.tokens[:a].tolist()).endswith("[/INST]")
        if r["messages"][0]["role"] == "system":
            assert "<<SYS>>" in tok.decode(e.tokens[:spans[0][0]].tolist())
    plain = load_examples(SAMSUM_CHAT, tok.__class__(tok.path))
    assert not torch.equal(plain[0].tokens[:20], examples[0].tokens[:20])


def write_lines(path, *objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_chat_template_failures_name_the_record(tok, monkeypatch, tmp_path):
    monkeypatch.setattr(tok, "chat_template", LLAMA2_TEMPLATE, raising=False)
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    path = write_lines(tmp_path / "c.jsonl", ok, bad)
    with pytest.raises(SlowllamaError, match=f"{path}:2: the chat template failed: Conversation roles must alternate"):
        load_examples(path, tok)
    # a template whose text for a prefix of the chat is not a prefix of the chat's text
    monkeypatch.setattr(tok, "chat_template", "{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                        "{% endfor %}", raising=False)
    with pytest.raises(SlowllamaError, match=f"{path}:1: .*turn by turn"):
        load_examples(path, tok)
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}", raising=False)
    with pytest.raises(SlowllamaError, match="chat_template: Jinja syntax error"):
        load_examples(path, tok)
    # a model template without jinja2 installed: a clear error (plain-template data needs no jinja2)
    monkeypatch.setattr(tok, "chat_template", LLAMA2_TEMPLATE, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "jinja2", None)
    with pytest.raises(SlowllamaError, match=r"needs jinja2: pip install 'slowllama\[chat\]'"):
        load_examples(path, tok)
    assert len(load_examples(SAMSUM, tok)) == 12


def one_sgd_step(src, folder, data, seq_len=64):
    """One SGD step of the offloaded engine on the first 2 sequential windows: (loss, weights after)."""
    store = Store.open(prepare_meta(src, folder, log=quiet), writable=True, log=quiet)
    engine = OffloadedModel(store, EngineConfig(torch.device("cpu"), torch.float32))
    x, y = step_windows(data, 0, 2, seq_len, "sequential", 0)
    result = Trainer(engine, StoreCheckpoint(store), log=quiet).step(1, [(x, y)], 0.05).result
    store.close()
    return result.loss, store_state_dict(folder)


def with_label(examples, position, delta=7, vocab=512):
    """The examples with the LABEL of one position of the first record changed; its input token unchanged."""
    first = examples[0]
    labels = first.labels.clone()
    labels[position] = (labels[position] + delta) % vocab
    return [first._replace(labels=labels)] + examples[1:]


def test_masking_a_prompt_label_changes_nothing_a_completion_label_does(tiny_fp32, tok, tmp_path):
    examples = load_examples(SAMSUM, tok)
    first = examples[0]
    T = 96  # the step's 2 windows of 97 cover positions 0..193; position 97 is an input only, never a target
    prompt_pos = 10
    completion_pos = runs(first.trainable)[0][0] + 2
    assert not first.trainable[prompt_pos] and first.trainable[completion_pos]
    assert completion_pos < 2 * (T + 1) and completion_pos % (T + 1) and prompt_pos % (T + 1)
    step = lambda name, exs: one_sgd_step(tiny_fp32, tmp_path / name, pack(exs, name), T)  # noqa: E731

    base_loss, base = step("base", examples)
    loss, weights = step("prompt", with_label(examples, prompt_pos))
    assert loss == base_loss
    assert_state_close(weights, base, rtol=0, atol=0)

    loss, weights = step("completion", with_label(examples, completion_pos))
    assert loss != base_loss
    with pytest.raises(AssertionError):
        assert_state_close(weights, base, rtol=0, atol=0)

    # without --mask-prompt the same prompt label does count (so the first check can fail)
    unmasked = load_examples(SAMSUM, tok, mask_prompt=False)
    store = Store.open(tmp_path / "base")
    engine = OffloadedModel(store, EngineConfig(torch.device("cpu"), torch.float32))
    losses = [engine.loss_sum([step_windows(pack(exs, "u"), 0, 2, T, "sequential", 0)])[0]
              for exs in (unmasked, with_label(unmasked, prompt_pos))]
    assert losses[0] != losses[1]


def test_packing_and_padding_windows(tok):
    examples = load_examples(SAMSUM, tok)
    T = 64
    packed = pack(examples, "packed")
    assert torch.equal(packed.tokens, torch.cat([e.tokens for e in examples]))
    # a window crossing the end of record 0: its EOS, then record 1's BOS, whose label is not a target
    end = len(examples[0].tokens)
    k = end // (T + 1)
    x, y = window(packed, k * (T + 1), T)  # eval's window k
    i = end - k * (T + 1)
    assert x[i - 1] == tok.eos_id and x[i] == tok.bos_id and y[i - 1] == IGNORE_INDEX

    T = 255  # every record fits
    padded = pad(examples, T, tok.eos_id, "padded")
    assert count_windows(padded, T) == 12
    rows = padded.tokens.view(12, T + 1)
    labels = padded.labels.view(12, T + 1)
    for row, lab, e in zip(rows, labels, examples):
        n = len(e.tokens)
        assert torch.equal(row[:n], e.tokens) and (row[n:] == tok.eos_id).all()
        assert torch.equal(lab[:n], e.masked_labels()) and (lab[n:] == IGNORE_INDEX).all()
    # sequential: the records in order, wrapping around; random: whole records, a function of (seed, step)
    x, _ = step_windows(padded, 2, 5, T, "sequential", 0)
    assert torch.equal(x, rows[[10, 11, 0, 1, 2], :T])
    x, y = step_windows(padded, 3, 8, T, "random", 0)
    picked = [next(j for j in range(12) if torch.equal(rows[j, :T], w)) for w in x]
    assert len(set(picked)) > 1
    assert torch.equal(y, labels[picked, 1:])
    assert torch.equal(step_windows(padded, 3, 8, T, "random", 0)[0], x)
    assert not torch.equal(step_windows(padded, 4, 8, T, "random", 0)[0], x)
    # longer records are truncated, and the log says how many
    notes = []
    short = pad(examples, 159, tok.eos_id, "short", notes)
    assert short.tokens.numel() == 12 * 160
    longer = sum(len(e.tokens) > 160 for e in examples)
    assert 0 < longer < 12
    assert torch.equal(short.tokens.view(12, 160), torch.stack([e.tokens[:160] if len(e.tokens) > 160 else
                                                                rows[j, :160] for j, e in enumerate(examples)]))
    assert notes == [f"short: {longer} of 12 records are longer than --seq-len + 1 = 160 tokens and were truncated "
                     "(--pack keeps them whole)"]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("order", ["random", "sequential"])
def test_steps_draw_only_windows_with_targets(tok, packed, order):
    examples = load_examples(SAMSUM, tok)
    T = 32 if packed else 140
    data = pack(examples, "p") if packed else pad(examples, T, tok.eos_id, "p")
    windows_without = sum(int((y == IGNORE_INDEX).all(1).sum()) for _, y in eval_batches(data, T, 8))
    assert windows_without > 0  # eval's windows include prompt-only ones (they count nothing there)
    for step in range(6):
        _, y = step_windows(data, step, 8, T, order, 0)
        assert (y != IGNORE_INDEX).any(1).all()


def settings(**kw):
    base = dict(store="unused", data=str(SAMSUM), seq_len=255, val_split=0.25, seed=0, pack=False)
    return FinetuneSettings(**{**base, **kw})


def padded_rows(data, T=255):
    return {tuple(r.tolist()) for r in data.tokens.view(-1, T + 1)}


def test_val_split_is_seeded_and_disjoint(tok):
    train, val = load_train_val(settings(), tok, quiet)
    assert (len(padded_rows(train)), len(padded_rows(val))) == (9, 3)
    assert padded_rows(train).isdisjoint(padded_rows(val))
    everything = padded_rows(pad(load_examples(SAMSUM, tok), 255, tok.eos_id, "all"))
    assert padded_rows(train) | padded_rows(val) == everything
    again_train, again_val = load_train_val(settings(), tok, quiet)
    assert torch.equal(again_val.tokens, val.tokens) and torch.equal(again_train.tokens, train.tokens)
    _, other = load_train_val(settings(seed=1), tok, quiet)
    assert padded_rows(other) != padded_rows(val)
    # packed: the same records, each part packed on its own
    examples = load_examples(SAMSUM, tok)
    train_idx, val_idx = split_indices(12, 0.25, 0, "records")
    ptrain, pval = load_train_val(settings(pack=True), tok, quiet)
    assert torch.equal(pval.tokens, torch.cat([examples[i].tokens for i in val_idx]))
    assert torch.equal(ptrain.tokens, torch.cat([examples[i].tokens for i in train_idx]))


def test_val_split_of_one_text_splits_its_windows(tok):
    log = []
    train, val = load_train_val(settings(data=str(ALICE), seq_len=64, val_split=0.1, pack=True), tok, log.append)
    whole = pack(load_examples(ALICE, tok), "alice")
    n = count_windows(whole, 64)
    all_windows = {tuple(r.tolist()) for r in whole.tokens[:n * 65].view(n, 65)}
    tw, vw = ({tuple(r.tolist()) for r in d.tokens.view(-1, 65)} for d in (train, val))
    assert len(vw) == round(0.1 * n) and tw.isdisjoint(vw) and tw | vw == all_windows
    assert log == [f"{ALICE}: {len(vw)} of {n} windows held out for validation (--val-split 0.1, seed 0)"]


def test_finetune_on_chat_jsonl_equals_in_memory_training(tiny_fp32, store_fp32, tok):
    s = settings(store=str(store_fp32), data=str(SAMSUM_CHAT), steps=2, batch_size=2, lr=0.05, device="cpu",
                 eval_every=0, log_every=0)
    result = finetune(s, log=quiet, emit=quiet)
    train, val = load_train_val(s, tok, quiet)
    model = train_in_memory(meta_model(tiny_fp32), train, 2, 2, 1, 255, 0.05)
    assert_state_close(store_state_dict(store_fp32), model.state_dict())
    # eval_loss at the end: the mean cross-entropy over the validation split's targets
    with torch.no_grad():
        model.eval()
        total = count = 0
        for x, y in eval_batches(val, 255, 4):
            total += cross_entropy_sum(model(x), y).item()
            count += int((y != IGNORE_INDEX).sum())
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["eval_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["eval_tokens"] == count
