"""Offloaded training equals plain in-memory autograd, tensor by tensor."""

import json

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text, microbatches, step_windows
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.engine.residency import working_bytes
from slowllama.engine.step import module_seed
from slowllama.formats.meta import export_meta, prepare_meta
from slowllama.model.layers import cross_entropy_sum
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.store.store import Store

from conftest import ALICE, run_cli
from reference import assert_state_close, meta_model, store_state_dict, train_in_memory

quiet = dict(log=lambda m: None, emit=lambda m: None)


def run_finetune(store, **kw):
    s = FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, **kw)
    return finetune(s, **quiet)


def reference_model(tiny_fp32, store, steps, batch_size, accumulate, seq_len, lr, order="random", seed=0,
                    dropout=0.0):
    data = load_text(ALICE, load_tokenizer(store))
    model = meta_model(tiny_fp32, dropout=dropout)
    return train_in_memory(model, data, steps, batch_size, accumulate, seq_len, lr, seed=seed, order=order,
                           dropout=dropout > 0)


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_three_sgd_steps_equal_in_memory_sgd(tiny_fp32, store_fp32, order):
    run_finetune(store_fp32, steps=3, batch_size=4, seq_len=32, lr=0.05, order=order)
    expected = reference_model(tiny_fp32, store_fp32, 3, 4, 1, 32, 0.05, order=order).state_dict()
    actual = store_state_dict(store_fp32)
    assert_state_close(actual, expected)
    # the weights did move, embeddings and output included
    before = meta_model(tiny_fp32).state_dict()
    for key in ("tok_embeddings.weight", "output.weight", "layers.3.feed_forward.w2.weight", "norm.weight"):
        assert not torch.equal(before[key], actual[key]), key


def test_accumulated_microbatches_equal_one_big_batch(tiny_fp32, tmp_path):
    a = prepare_meta(tiny_fp32, tmp_path / "a", log=lambda m: None)
    b = prepare_meta(tiny_fp32, tmp_path / "b", log=lambda m: None)
    run_finetune(a, steps=2, batch_size=2, accumulate=3, seq_len=32, lr=0.05)
    run_finetune(b, steps=2, batch_size=6, accumulate=1, seq_len=32, lr=0.05)
    assert_state_close(store_state_dict(a), store_state_dict(b))
    expected = reference_model(tiny_fp32, a, 2, 6, 1, 32, 0.05).state_dict()
    assert_state_close(store_state_dict(a), expected)


def test_dropout_masks_are_replayed_in_the_backward_pass(tiny_fp32, store_fp32):
    run_finetune(store_fp32, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=0.05, dropout=0.2, seed=3)
    expected = reference_model(tiny_fp32, store_fp32, 3, 2, 2, 32, 0.05, seed=3, dropout=0.2).state_dict()
    assert_state_close(store_state_dict(store_fp32), expected)
    # and without the replay (other masks in the recompute) the result would differ
    wrong = reference_model(tiny_fp32, store_fp32, 3, 2, 2, 32, 0.05, seed=4, dropout=0.2).state_dict()
    with pytest.raises(AssertionError):
        assert_state_close(store_state_dict(store_fp32), wrong)


def test_forward_logits_equal_recompute_logits_with_dropout(store_fp32):
    # the output of every block in the forward pass equals its recomputation in the backward pass
    store = Store.open(store_fp32, writable=True, log=lambda m: None)
    engine = OffloadedModel(store, EngineConfig(torch.device("cpu"), torch.float32, dropout=0.3, seed=5))
    data = load_text(ALICE, load_tokenizer(store_fp32))
    x, y = step_windows(data, 0, 4, 32, "random", 5)
    batches = microbatches(x, y, 2)
    acts = engine.activations()
    hs = engine.forward_hidden([b for b, _ in batches], acts, train=True, step=1)
    cos, sin = engine.rope(32)
    last = store.args.n_layers - 1
    block = engine.module(f"layers.{last}", train=True)
    for k in range(2):
        torch.manual_seed(module_seed(5, 1, k, last + 1))
        torch.testing.assert_close(block(acts.get((last, k)), cos, sin), hs[k], rtol=0, atol=0)
        torch.manual_seed(module_seed(5, 1, k, last + 2))
        with pytest.raises(AssertionError):  # another seed draws other masks
            torch.testing.assert_close(block(acts.get((last, k)), cos, sin), hs[k], rtol=0, atol=0)
    acts.clear()
    store.close()


def test_activations_spilled_to_scratch_give_the_same_result(tiny_fp32, tmp_path):
    a = prepare_meta(tiny_fp32, tmp_path / "a", log=lambda m: None)
    b = prepare_meta(tiny_fp32, tmp_path / "b", log=lambda m: None)
    run_finetune(a, steps=2, batch_size=2, accumulate=2, seq_len=32, lr=0.05)
    # a budget just above the working set of the module in flight: activations go to the scratch folder
    work = working_bytes(Store.open(b).args, torch.float32, torch.float32, train=True, batch_size=2, seq_len=32,
                         microbatches=2)
    run_finetune(b, steps=2, batch_size=2, accumulate=2, seq_len=32, lr=0.05, max_memory=str(work + 20_000))
    assert_state_close(store_state_dict(a), store_state_dict(b), rtol=0, atol=0)


def test_finetune_export_prepare_continue(tiny_fp32, store_fp32, tmp_path):
    run_finetune(store_fp32, steps=2, batch_size=2, seq_len=32, lr=0.05)
    out = export_meta(store_fp32, tmp_path / "exported", log=lambda m: None)
    again = prepare_meta(out, tmp_path / "again", log=lambda m: None)
    assert_state_close(store_state_dict(again), store_state_dict(store_fp32), rtol=0, atol=0)
    result = run_finetune(again, steps=2, batch_size=2, seq_len=32, lr=0.05)
    assert result["step"] == 2
    # two more steps on the re-prepared store equal four in memory (steps 0, 1 of a new run again)
    model = meta_model(out)
    data = load_text(ALICE, load_tokenizer(again))
    expected = train_in_memory(model, data, 2, 2, 1, 32, 0.05, order="random").state_dict()
    assert_state_close(store_state_dict(again), expected)


def test_finished_run_does_nothing(store_fp32):
    run_finetune(store_fp32, steps=2, batch_size=2, seq_len=32, lr=0.05)
    before = store_state_dict(store_fp32)
    result = run_finetune(store_fp32, steps=2, batch_size=2, seq_len=32, lr=0.05)
    assert result.get("nothing_to_do")
    assert_state_close(store_state_dict(store_fp32), before, rtol=0, atol=0)
    proc = run_cli("finetune", store_fp32, "--data", ALICE, "--steps", 2, "--batch-size", 2, "--seq-len", 32,
                   "--lr", 0.05, "--device", "cpu", check=0)
    assert "nothing to do" in proc.stderr


def test_cli_json_lines_and_run_log(store_fp32):
    proc = run_cli("finetune", store_fp32, "--data", ALICE, "--steps", 3, "--batch-size", 2, "--accumulate", 2,
                   "--seq-len", 32, "--lr", 0.05, "--device", "cpu", "--json", "--eval-every", 2,
                   "--val-data", ALICE, "--prompt", "Alice", "--save-every", 1, check=0)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert {"step", "loss", "tokens", "seconds", "bytes_read", "bytes_written", "peak_rss_bytes"} <= set(m)
        assert m["tokens"] == 2 * 2 * 32
        assert m["bytes_written"] > 0
    assert "eval loss" in proc.stderr and '"Alice' in proc.stderr
    run = Store.open(store_fp32).path / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    settings = json.loads((run / "settings.json").read_text())["settings"]
    assert settings["lr"] == 0.05 and settings["accumulate"] == 2


def test_loss_is_the_mean_over_all_targets(tiny_fp32, store_fp32):
    result = run_finetune(store_fp32, steps=1, batch_size=3, accumulate=2, seq_len=32, lr=1e-9)
    data = load_text(ALICE, load_tokenizer(store_fp32))
    x, y = step_windows(data, 0, 6, 32, "random", 0)
    with torch.no_grad():
        loss = cross_entropy_sum(meta_model(tiny_fp32)(x), y).item() / y.numel()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


MEMORY_SCRIPT = """
import sys
from slowllama.settings import FinetuneSettings
from slowllama.commands.finetune import finetune

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current RSS, after the imports
before = status("VmRSS")
settings = FinetuneSettings(store=sys.argv[1], data=sys.argv[2], steps=int(sys.argv[3]), batch_size=2, seq_len=64, lr=0.01,
                          device="cpu", eval_every=0, log_every=0)
# a budget of the working set of the module in flight and 1 MB: nothing stays resident
import torch
from slowllama.engine.residency import working_bytes
from slowllama.store.store import Store
settings.max_memory = str(working_bytes(Store.open(sys.argv[1]).args, torch.float32, torch.float32, train=True,
                                        batch_size=2, seq_len=64) + (1 << 20))
finetune(settings, log=lambda m: None, emit=lambda m: None)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_does_not_grow_with_layers(tmp_path):
    import subprocess
    import sys

    from slowllama.formats.tiny import write_tiny

    from conftest import REPO

    dim = 512
    peaks = {}
    few, many = 3, 12
    for layers in (few, many):
        src = write_tiny(tmp_path / f"m{layers}", dtype="fp32", shards=1, dim=dim, n_layers=layers, n_heads=8,
                         n_kv_heads=8, multiple_of=64)
        store = prepare_meta(src, tmp_path / f"s{layers}", log=lambda m: None)
        # glibc keeps freed memory in per-thread arenas and the heap (blocks under its dynamic mmap
        # threshold, up to 32 MB, come from there): noise at this size, so it is told to give memory
        # back (real blocks, 200 MB and more, are always mmapped and returned)
        env = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
               "MALLOC_ARENA_MAX": "1"}
        # as many module passes for both: the peak of the read-ahead and write-back in flight is a maximum
        # over passes, and the few layers must get as many chances at it as the many
        steps = 2 * many // layers
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(store), str(ALICE), str(steps)],
                             capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
        assert out.returncode == 0, out.stderr
        peaks[layers] = int(out.stdout.strip().splitlines()[-1])
    block = 12 * dim * dim * 4 + 3 * dim * 4 * dim  # wq wk wv wo + w1 w2 w3 (hidden 1408) in fp32, roughly
    cached_inputs = many * 2 * 64 * dim * 4
    assert peaks[many] - peaks[few] < block + cached_inputs, peaks


def test_tied_embeddings_train_like_in_memory(tiny_fp32, tmp_path):
    # Llama 3.2 1B/3B style: the output projection is the embedding matrix, trained from both ends
    from slowllama.formats.meta import store_from_state_dict
    from slowllama.model.layers import Transformer

    from reference import meta_state_dict

    _, args = __import__("slowllama.formats.meta", fromlist=["read_meta_params"]).read_meta_params(tiny_fp32)
    args.tie_word_embeddings = True
    sd = meta_state_dict(tiny_fp32)
    sd.pop("output.weight")
    sd.pop("rope.freqs")
    store = store_from_state_dict(sd, args, tmp_path / "tied", tokenizer=tiny_fp32 / "tokenizer.model")
    model = Transformer(args)
    model.load_state_dict(sd)
    assert "head" in Store.open(store).manifest.files["modules"]
    assert list(Store.open(store).read("head")) == ["norm.weight"]
    run_finetune(store, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=0.05)
    data = load_text(ALICE, load_tokenizer(store))
    train_in_memory(model, data, 3, 2, 2, 32, 0.05, order="random")
    assert_state_close(store_state_dict(store), model.state_dict())
