"""Blocks streamed by weight (--stream-unit weight) train exactly as in-memory autograd and torch.optim do, and a
model whose block alone exceeds the budget trains within it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from slowllama.commands.common import default_host_budget, run_budgets
from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.engine.residency import (HOST_ALLOWANCE, Need, choose_need, memory_need, minimum_budgets,
                                        split_budgets)
from slowllama.errors import SlowllamaError
from slowllama.formats.meta import prepare_meta
from slowllama.model.lora import LoRAConfig
from slowllama.model.shapes import model_param_count
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.store import safetensors_io as st
from slowllama.store.store import Store

from conftest import ALICE, REPO, assert_one_line_error, run_cli
from reference import assert_state_close, meta_model, store_state_dict, train_in_memory
from test_lora import TARGET_LIST, in_memory_lora, run_lora

quiet = dict(log=lambda m: None, emit=lambda m: None)
GiB = 1 << 30


def run_finetune(store, **kw):
    s = FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, stream_unit="weight", **kw)
    return finetune(s, **quiet)


def alice(store):
    return load_text(ALICE, load_tokenizer(store))


def test_sgd_with_dropout_and_microbatches_equals_in_memory(tiny_fp32, store_fp32):
    run_finetune(store_fp32, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=0.05, dropout=0.2, seed=3)
    model = meta_model(tiny_fp32, dropout=0.2)
    train_in_memory(model, alice(store_fp32), 3, 2, 2, 32, 0.05, seed=3, dropout=True)
    assert_state_close(store_state_dict(store_fp32), model.state_dict())
    # the blocks were written weight by weight: one checksum per tensor
    entry = json.loads((store_fp32 / "manifest.json").read_text())["files"]["modules"]["layers.2"]
    assert entry["xxh3"] == "" and len(entry["tensors"]) == 9


def test_adamw_with_weight_decay_and_exact_clipping_equals_torch(tiny_fp32, store_fp32):
    run_finetune(store_fp32, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=1e-3, optimizer="adamw",
                 adam_betas="0.8,0.95", adam_eps=1e-6, weight_decay=0.1, grad_clip=0.5, clip_norm="exact")
    model = meta_model(tiny_fp32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)

    class Clipped:
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            assert norm > 0.5  # clipping bites
            opt.step()
    train_in_memory(model, alice(store_fp32), 3, 2, 2, 32, 1e-3, optimizer=Clipped())
    assert_state_close(store_state_dict(store_fp32), model.state_dict())
    state = Store.open(store_fp32).read_state("layers.1", "optim")
    expected = opt.state[model.layers[1].feed_forward.w2.weight]["exp_avg_sq"]
    torch.testing.assert_close(state["feed_forward.w2.weight.exp_avg_sq"], expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("extra", [dict(master_weights="fp32", optimizer="adamw", lr=1e-3),
                                   dict(rounding="stochastic", lr=0.05)], ids=["master-weights", "stochastic"])
def test_16_bit_stores_stream_by_weight_as_by_block(tiny_bf16, tmp_path, extra):
    stores = {}
    for unit in ("block", "weight"):
        stores[unit] = prepare_meta(tiny_bf16, tmp_path / unit, log=lambda m: None)
        s = FinetuneSettings(store=str(stores[unit]), data=str(ALICE), device="cpu", eval_every=0, steps=2,
                             batch_size=2, accumulate=2, seq_len=32, stream_unit=unit, **extra)
        finetune(s, **quiet)
    block, weight = store_state_dict(stores["block"]), store_state_dict(stores["weight"])
    for key in block:
        assert torch.equal(block[key], weight[key]), key


def test_lora_streamed_by_weight_equals_in_memory(tiny_fp32, store_fp32, tmp_path):
    cfg = LoRAConfig(4, 8.0, 0.0, tuple(TARGET_LIST.split(",")))
    digest = st.hash_file(str(store_fp32 / Store.open(store_fp32).manifest.files["modules"]["layers.0"].file))
    run_lora(store_fp32, tmp_path / "ad", steps=2, lr=1e-2, accumulate=2, stream_unit="weight")
    model, params = in_memory_lora(tiny_fp32, cfg, seed=0)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    train_in_memory(model, alice(store_fp32), 2, 2, 2, 32, 1e-2, optimizer=opt)
    after = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    for key, p in params.items():
        torch.testing.assert_close(after[key], p.detach(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    assert st.hash_file(str(store_fp32 / Store.open(store_fp32).manifest.files["modules"]["layers.0"].file)) == digest


def test_a_damaged_weight_is_refused_when_read_on_its_own(store_fp32):
    run_finetune(store_fp32, steps=1, batch_size=2, seq_len=32, lr=0.05)
    store = Store.open(store_fp32)
    info = store.manifest.files["modules"]["layers.1"]
    path = store_fp32 / info.file
    header, start = st.read_header(open(path, "rb"), str(path))
    begin = header["feed_forward.w3.weight"]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start + begin + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SlowllamaError, match="checksum mismatch in 'feed_forward.w3.weight'"):
        store.read("layers.1/feed_forward.w3.weight")
    with pytest.raises(SlowllamaError, match="checksum mismatch"):
        store.read("layers.1")
    assert store.read("layers.1/feed_forward.w1.weight")  # the others are whole
    assert_one_line_error(run_cli("finetune", store_fp32, "--data", ALICE, "--steps", 2, "--stream-unit", "weight",
                                  "--device", "cpu", "--eval-every", 0), "checksum mismatch")


# ---- budgets --------------------------------------------------------------------------------
def test_runs_choose_the_unit_and_read_ahead_their_budgets_hold():
    from slowllama.model.families import preset_args
    args = preset_args("70b", n_layers=4)

    def needs(unit, lookahead, write_queue):
        return memory_need(args, torch.bfloat16, torch.bfloat16, "cuda", train=True, batch_size=1, seq_len=512,
                           unit=unit, lookahead=lookahead, write_queue=write_queue)
    roomy = choose_need("auto", "cuda", 64 * GiB, 64 * GiB, 2, 2, needs)
    assert (roomy.unit, roomy.lookahead) == ("block", 2)
    tight = choose_need("auto", "cuda", 4 * GiB, 8 * GiB, 2, 2, needs)
    assert tight.unit == "weight"
    assert tight.work < needs("block", 2, 2).work / 2
    # 70B fits a 16 GB Mac's 12 GiB (host and GPU together) by weight, not by block
    assert sum(minimum_budgets("cuda", needs("weight", 1, 1))) < 12 * GiB < sum(minimum_budgets(
        "cuda", needs("block", 2, 2)))
    assert choose_need("block", "cuda", 4 * GiB, 8 * GiB, 2, 2, needs).unit == "block"  # as asked (then refused)


def test_unified_memory_has_one_budget():
    need = Need(work=3 * GiB, staging=0, activations=2 * GiB)
    budgets = split_budgets("mps", 12 * GiB, 0, need)
    assert budgets.host == 0 and budgets.host_activations == 0  # nothing kept twice
    assert budgets.device + budgets.activations == 9 * GiB and budgets.activations == 2 * GiB
    assert minimum_budgets("mps", need) == (3 * GiB, 0)
    with pytest.raises(SlowllamaError, match="--max-memory: 2.0 GiB is below the 3.0 GiB"):
        split_budgets("mps", 2 * GiB, 0, need)
    assert default_host_budget("mps", 16 * GiB) == 12 * GiB  # a 16 GB Mac keeps 4 GiB for the system
    assert default_host_budget("mps", 64 * GiB) == 48 * GiB
    assert default_host_budget("cpu", 16 * GiB) == 8 * GiB

    class Settings:
        max_memory, max_gpu_memory = "10G", "4G"
    with pytest.raises(SlowllamaError, match="--max-gpu-memory: mps computes in the host's memory"):
        run_budgets(Settings(), torch.device("mps"))
    Settings.max_gpu_memory = "auto"
    assert run_budgets(Settings(), torch.device("mps")) == (10 * GiB, 0)


MEMORY_SCRIPT = """
import json, sys
from slowllama.bench.machine import peak_rss, reset_peak_rss
from slowllama.commands.finetune import finetune
from slowllama.settings import FinetuneSettings
baseline = peak_rss()
reset_peak_rss()
s = FinetuneSettings(store=sys.argv[1], data=sys.argv[2], device="cpu", eval_every=0, steps=1, batch_size=1,
                     seq_len=16, lr=1e-3, max_memory=sys.argv[3], save_every=1)
result = finetune(s, log=lambda m: print(m, file=sys.stderr), emit=lambda m: None)
print(json.dumps({"baseline": baseline, "peak": peak_rss()}))
"""


def test_a_model_whose_block_exceeds_the_budget_trains_within_it(tmp_path):
    from slowllama.formats.tiny import write_tiny
    # a 13B-wide block (317 M weights, 634 MB in bf16, 1.3 GB in the fp32 the CPU computes in) under 2 GiB
    src = write_tiny(tmp_path / "m", dtype="bf16", shards=1, dim=5120, n_layers=1, n_heads=40, n_kv_heads=40,
                     multiple_of=256, ffn_dim_multiplier=None)
    store = prepare_meta(src, tmp_path / "s", log=lambda m: None)
    args = Store.open(store).args
    block_bytes = model_param_count(args)["block"] * 2
    budget = 2 * GiB
    assert block_bytes * 4 > budget  # the block in its compute dtype with its gradient is over the budget
    assert_one_line_error(run_cli("finetune", store, "--data", ALICE, "--steps", 1, "--device", "cpu",
                                  "--max-memory", str(budget), "--stream-unit", "block", "--seq-len", 16),
                          "--max-memory", "the minimum")
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(store), str(ALICE), str(budget)],
                         capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert out.returncode == 0, out.stderr
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss["peak"] <= budget + HOST_ALLOWANCE, rss
    assert rss["peak"] <= budget + rss["baseline"] + (128 << 20), rss  # the runtime is what it is before the run
    assert Store.open(store).step == 1
