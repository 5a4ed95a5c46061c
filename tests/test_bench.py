"""slowllama bench: its arithmetic (by hand), its random store, its machine probes and its output."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from slowllama.bench.machine import (copy_bandwidth, disk_read_bandwidth, disk_write_bandwidth, matmul_peak,
                                     page_cache_read_bandwidth, page_cache_residency, peak_rss, reset_peak_rss)
from slowllama.bench.roofline import (Machine, attention_flops, bound, efficiency, matmul_params, median_after_warmup,
                                      step_flops, tier_seconds)
from slowllama.bench.synthetic import bench_args, open_or_build, random_batches, store_bytes, write_random_store
from slowllama.commands.bench import bench
from slowllama.engine.residency import working_bytes
from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.families import preset_args
from slowllama.model.layers import Transformer, build_module
from slowllama.model.shapes import module_names, module_shapes
from slowllama.optim.adamw import AdamW
from slowllama.settings import BenchSettings
from slowllama.store.store import Store

from conftest import assert_one_line_error, run_cli

# dim 8, 2 heads of 4, 1 kv head, FFN 12, vocab 10, 2 layers: small enough to count by hand
SMALL = ModelArgs(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=10, multiple_of=4, hidden_dim_override=12)


# ---- arithmetic ------------------------------------------------------------------------------
def test_matmul_params_by_hand():
    # per block: wq 8x8 + wk 8x4 + wv 8x4 + wo 8x8 + w1, w2, w3 8x12 = 64 + 32 + 32 + 64 + 288
    assert matmul_params(SMALL) == {"blocks": 2 * 480, "head": 80, "total": 1040}
    block = build_module(SMALL, "layers.0", device="cpu")
    assert sum(p.numel() for k, p in block.named_parameters() if "norm" not in k) == 480


def test_matmul_params_of_llama2_7b():
    # Llama 2 7B has 6,738,415,616 weights: minus the embedding table (32000 x 4096) and 65 norms of 4096
    assert matmul_params(preset_args("7b"))["total"] == 6_738_415_616 - 32000 * 4096 - 65 * 4096


def test_forward_matmul_flops_are_2NT():
    from torch.utils.flop_counter import FlopCounterMode

    model = Transformer(SMALL)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(10, (3, 5)))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.mm] == 2 * 1040 * 15


def test_attention_and_step_flops_by_hand():
    # causal: query i meets i + 1 keys; sum over 5 queries = 15; 2 matmuls x 2 FLOPs x width 8 x 15 = 480
    assert attention_flops(SMALL, windows=3, seq_len=5) == 2 * 3 * 480
    f = step_flops(SMALL, windows=3, seq_len=5)  # T = 15 tokens, A = 2880
    assert f.model == 6 * 1040 * 15 + 3 * 2880
    assert f.hardware == 8 * 960 * 15 + 6 * 80 * 15 + 4 * 2880


MACHINE = Machine(disk_read=2e9, disk_write=1e9, page_cache_read=10e9, matmul=100e12, h2d=50e9, d2h=25e9)


def test_tiers_and_the_bound_picks_the_slowest():
    tiers = tier_seconds(10e9, 5e9, 300e12, MACHINE, cache_dropped=True, h2d_bytes=100e9, d2h_bytes=100e9)
    assert tiers == pytest.approx({"storage": 5 + 5, "pcie": max(2, 4), "compute": 3})
    assert bound(tiers) == ("storage", pytest.approx(10))
    # page cache kept: reads count at page-cache speed
    assert tier_seconds(10e9, 5e9, 300e12, MACHINE, cache_dropped=False)["storage"] == pytest.approx(1 + 5)
    # no host<->device counts: no pcie tier; enough FLOPs and compute bounds the step
    tiers = tier_seconds(10e9, 5e9, 1500e12, MACHINE, cache_dropped=True)
    assert set(tiers) == {"storage", "compute"}
    assert bound(tiers) == ("compute", pytest.approx(15))
    tiers = tier_seconds(0, 0, 1e12, MACHINE, cache_dropped=True, h2d_bytes=500e9, d2h_bytes=0)
    assert bound(tiers) == ("pcie", pytest.approx(10))


def test_efficiency_and_medians():
    assert efficiency(10.0, 12.5) == pytest.approx(0.8)
    assert median_after_warmup([10.0, 2.0, 4.0, 3.0]) == 3.0  # the first step (10) is warm-up
    assert median_after_warmup([5.0]) == 5.0
    assert median_after_warmup([None, 1.0, 3.0]) == 2.0
    assert median_after_warmup([1.0, None]) is None


# ---- the random store ------------------------------------------------------------------------
def test_random_store_is_a_valid_store_of_the_preset_cut_to_layers(tmp_path):
    args = bench_args("tiny", layers=2)
    assert args == preset_args("tiny", n_layers=2) and args.n_layers == 2
    path, built = open_or_build(tmp_path / "s", args, torch.bfloat16, log=lambda m: None)
    assert built
    store = Store.open(path)
    assert store.args == args and store.dtype == torch.bfloat16
    assert sorted(store.manifest.files["modules"]) == sorted(module_names(args))
    assert store.verify_all() == []
    data = 0
    for name in module_names(args):
        tensors = store.read(name)
        assert {k: tuple(t.shape) for k, t in tensors.items()} == module_shapes(args, name)
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        data += sum(t.numel() * 2 for t in tensors.values())
    assert data == store_bytes(args, torch.bfloat16)
    layer = store.read("layers.1")
    assert torch.equal(layer["attention_norm.weight"].float(), torch.ones(args.dim))
    assert 0.015 < layer["feed_forward.w1.weight"].float().std().item() < 0.025
    # the same shape is reused, another one refused
    assert open_or_build(path, args, torch.bfloat16, log=lambda m: None) == (path, False)
    with pytest.raises(SlowllamaError, match="another shape"):
        open_or_build(path, bench_args("tiny", layers=3), torch.bfloat16, log=lambda m: None)
    (tmp_path / "other").mkdir()
    with pytest.raises(SlowllamaError, match="is not a store"):
        open_or_build(tmp_path / "other", args, torch.bfloat16, log=lambda m: None)


def test_big_preset_shapes_and_sizes():
    args = bench_args("70b", layers=1)
    assert (args.dim, args.n_layers, args.kv_heads, args.hidden_dim) == (8192, 1, 8, 28672)
    assert store_bytes(bench_args("7b"), torch.bfloat16) == 2 * 6_738_415_616
    with pytest.raises(SlowllamaError, match="--layers"):
        bench_args("7b", layers=0)


def test_random_batches():
    args = bench_args("tiny")
    batches = random_batches(args, step=3, batch_size=2, accumulate=3, seq_len=16)
    assert len(batches) == 3 and all(x.shape == y.shape == (2, 16) for x, y in batches)
    x, y = batches[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert int(x.min()) >= 0 and int(x.max()) < args.vocab_size
    again = random_batches(args, step=3, batch_size=2, accumulate=3, seq_len=16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not torch.equal(random_batches(args, 4, 2, 3, 16)[0][0], x)


# ---- machine measurements --------------------------------------------------------------------
def test_disk_measurements_on_a_small_file(tmp_path):
    path = str(tmp_path / "probe")
    assert disk_write_bandwidth(path, 4 << 20) > 0
    assert os.path.getsize(path) == 4 << 20
    read, resident = disk_read_bandwidth(path)
    assert read > 0 and (resident is None or 0.0 <= resident <= 1.0)
    assert page_cache_read_bandwidth(path) > 0
    residency = page_cache_residency(path)
    if residency is not None:  # Linux: the file was just read, so all of it is cached
        assert residency == 1.0
        sparse = tmp_path / "sparse"
        with open(sparse, "wb") as f:
            f.truncate(1 << 20)  # a hole: no page of it was ever cached
        assert page_cache_residency(str(sparse)) == 0.0


def test_matmul_peak_and_copies_on_cpu():
    assert matmul_peak(torch.device("cpu"), torch.float32, n=64, reps=2, rounds=1) > 0
    assert copy_bandwidth(torch.device("cpu")) == (None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_copies_and_matmul_on_cuda():
    h2d, d2h = copy_bandwidth(torch.device("cuda"), nbytes=64 << 20, reps=2)
    assert h2d > 0 and d2h > 0
    assert matmul_peak(torch.device("cuda"), torch.bfloat16, n=1024, reps=4) > 0


def test_peak_rss_restarts_at_reset():
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs")
    base = peak_rss()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
    high = peak_rss()
    assert high >= base + (60 << 20)
    del block
    reset_peak_rss()
    assert peak_rss() < high - (32 << 20)


def test_drop_cache_evicts_written_files(tmp_path):
    probe = str(tmp_path / "probe")
    disk_write_bandwidth(probe, 1 << 20)
    _, resident = disk_read_bandwidth(probe)  # evicts it first
    if resident != 0.0:
        pytest.skip("this filesystem keeps files in the page cache (or residency is unknown)")
    path = write_random_store(tmp_path / "s", bench_args("tiny", layers=1), torch.bfloat16, log=lambda m: None)
    store = Store.open(path, writable=True, log=lambda m: None)
    try:
        tensors = store.read("layers.0")
        store.drop_cache = True
        store.write("layers.0", tensors)
        store.sync()  # evicted once durable: the fsync runs in the background
        assert page_cache_residency(str(store.path / store.file_info("layers.0").file)) == 0.0
        store.drop_cache = False
        store.write("head", store.read("head"))
        assert page_cache_residency(str(store.path / store.file_info("head").file)) > 0.5
        store.rollback()
        store.drop_cache = True
        store.read("tok_embeddings")
        assert page_cache_residency(str(store.path / store.file_info("tok_embeddings").file)) == 0.0
    finally:
        store.close()


# ---- the command -----------------------------------------------------------------------------
STEP_KEYS = {"step", "loss", "tokens", "seconds", "tokens_per_second", "model_flops", "hardware_flops",
             "model_tflops", "hardware_tflops", "mfu", "bytes_read", "bytes_written", "read_gbps", "write_gbps",
             "storage", "peak_rss_bytes", "peak_gpu_bytes", "tier_seconds", "bound_tier", "bound_seconds",
             "efficiency"}
SUMMARY_MEDIANS = {"seconds", "tokens_per_second", "model_tflops", "hardware_tflops", "mfu", "read_gbps",
                   "write_gbps", "bound_seconds", "efficiency"}
SMALL_RUN = dict(preset="tiny", layers=2, batch_size=2, seq_len=32, probe_size="4M", device="cpu")


def streaming_budget(stateful: bool = False, microbatches: int = 1) -> str:
    """--max-memory just above the working set of the module in flight: no module stays resident."""
    work = working_bytes(bench_args("tiny", layers=2), torch.bfloat16, torch.float32, train=True,
                         optimizer=AdamW() if stateful else None,
                         batch_size=2, seq_len=32, microbatches=microbatches)
    return str(work + 50_000)


def test_bench_text_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = []
    summary = bench(BenchSettings(**SMALL_RUN, steps=3, max_memory=streaming_budget(), drop_cache=True), lambda m: None,
                    lines.append)
    step_re = re.compile(
        r"^step (\d)/3: [\d.]+ s, \d+ tok/s, [\d.e+-]+ TFLOP/s model \(MFU [\d.]+%\), [\d.e+-]+ TFLOP/s hardware"
        r" \| SSD: read [\d.]+ [kMG]?B \([\d.]+ GB/s\), written [\d.]+ [kMG]?B \([\d.]+ GB/s\)"
        r"( \| activations spilled [\d.]+ [kMG]?B)? \| peak RSS [\d.]+ [kMG]?B"
        r" \| waited on reads [\d.]+ s, on writes [\d.]+ s \| bound [\d.]+ s \((storage|compute)\), efficiency [\d.]+%"
        r" \| loss [\d.]+$")
    steps = [step_re.match(line) for line in lines[:3]]
    assert all(steps), lines[:3]
    assert [m[1] for m in steps] == ["1", "2", "3"]
    rest = "\n".join(lines[3:])
    for fragment in ("model: preset tiny, 2 layers", "FLOPs/step: model", "hardware", "machine: disk write",
                     "page cache dropped", "median of steps 2-3:", "efficiency", "peak RSS"):
        assert fragment in rest
    assert "without --drop-cache" not in rest
    assert summary["steps"] == 3 and not os.listdir(tmp_path)  # the temporary store is gone


def test_bench_profile_writes_the_steps_after_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = []
    bench(BenchSettings(**SMALL_RUN, steps=2, profile=str(tmp_path / "p.txt")), logs.append, lambda m: None)
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("1 steps profiled, ") and "by self_cpu_time_total:" in text and "aten::mm" in text
    assert any(line.startswith(f"wrote the profile to {tmp_path / 'p.txt'}: 1 steps profiled, ") for line in logs), logs


def test_bench_json_output_through_the_cli(tmp_path):
    proc = run_cli("bench", "--preset", "tiny", "--layers", "2", "--batch-size", "2", "--accumulate", "2",
                   "--seq-len", "32", "--steps", "2", "--probe-size", "4M", "--device", "cpu",
                   "--max-memory", streaming_budget(stateful=True, microbatches=2),
                   "--optimizer", "adamw", "--store-dir", tmp_path / "s", "--json", check=0)
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objs) == 3 and [o.get("step") for o in objs[:2]] == [1, 2] and objs[2]["summary"] is True
    args = bench_args("tiny", layers=2)
    for o in objs[:2]:
        assert STEP_KEYS <= set(o), STEP_KEYS - set(o)
        assert o["tokens"] == 2 * 2 * 32
        assert o["model_flops"] == step_flops(args, 4, 32).model
        assert o["bytes_read"] > store_bytes(args, torch.bfloat16)  # 64K holds no module: all read, some twice
        assert o["bytes_written"] > 0 and o["storage"] == "page cache"
        assert o["spill_bytes"] > 0  # the budget holds hardly any block input
        assert o["bound_seconds"] == pytest.approx(max(o["tier_seconds"].values()))
        assert o["efficiency"] == pytest.approx(o["bound_seconds"] / o["seconds"])
        assert o["tokens_per_second"] == pytest.approx(o["tokens"] / o["seconds"])
    # AdamW: the second step reads the moments the first wrote
    assert objs[1]["bytes_read"] > objs[0]["bytes_read"]
    s = objs[2]
    assert s["median"]["seconds"] == pytest.approx(objs[1]["seconds"])
    assert all(s["median"][k] is not None for k in SUMMARY_MEDIANS)
    for key in ("disk_read_gbps", "disk_write_gbps", "page_cache_read_gbps", "matmul_tflops"):
        assert s["machine"][key] > 0
    assert s["machine"]["h2d_gbps"] is None and s["peak_gpu_bytes"] is None
    assert s["peak_rss_bytes"] > 0 and s["optimizer"] == "adamw" and s["layers"] == 2
    assert Store.open(tmp_path / "s").step == 2  # --store-dir keeps the store, steps committed


def test_bench_lora_writes_nothing_to_the_store(tmp_path):
    proc = run_cli("bench", "--preset", "tiny", "--layers", "2", "--batch-size", "2", "--seq-len", "32",
                   "--steps", "2", "--probe-size", "4M", "--device", "cpu", "--lora-rank", "4",
                   "--store-dir", tmp_path / "s", "--json", check=0)
    steps = [json.loads(line) for line in proc.stdout.splitlines()][:2]
    assert [o["bytes_written"] for o in steps] == [0, 0]
    assert Store.open(tmp_path / "s").step == 0


def test_bad_bench_input_is_one_line(tmp_path):
    assert_one_line_error(run_cli("bench", "--seq-len", "4096", "--device", "cpu", cwd=tmp_path), "--seq-len")
    assert not os.listdir(tmp_path)  # nothing left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without cuda")
def test_fsdp2_script_refuses_without_cuda():
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp2_offload.py"), "--layers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc, "needs a CUDA GPU")
