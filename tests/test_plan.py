"""`slowllama plan`: its minimums are what runs accept, its arithmetic, its sources and its bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import ALICE, assert_one_line_error

from slowllama.bench.machine import load_machines, machine_kind, save_machine
from slowllama.commands.bench import measure_machine
from slowllama.formats.meta import meta_params
from slowllama.model.families import preset_args
from slowllama.model.shapes import model_param_count
from slowllama.sizes import format_size

STEP = ("--batch-size", "1", "--seq-len", "16", "--accumulate", "2")  # K > 1: a block's gradients wait for the last


@pytest.fixture(autouse=True)
def machine_cache(tmp_path, monkeypatch):
    """Each test its own machine cache (none until a test writes one)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "slowllama" / "machine.json"


def plan_json(cli, *args) -> dict:
    proc = cli("plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def row(plan: dict, name: str) -> dict:
    return next(r for r in plan["configs"] if r["name"] == name)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lora"])
def test_the_minimum_is_what_a_run_accepts_and_a_byte_less_is_refused(cli, store_fp32, tmp_path, name):
    minimum = row(plan_json(cli, store_fp32, "--device", "cpu", *STEP), name)["min_memory"]
    how = (["--lora-rank", "8", "--adapter-path", tmp_path / "adapters"] if name == "lora"
           else ["--optimizer", name])

    def finetune(budget):
        return cli("finetune", store_fp32, "--data", ALICE, "--device", "cpu", "--steps", "1", "--eval-every", "0",
                   "--max-memory", budget, *STEP, *how)

    refused = finetune(minimum - 1)  # refused before anything is written: the same store serves both runs
    assert_one_line_error(refused, "--max-memory", f"the {format_size(minimum)} ", f"(the minimum: {minimum} bytes)")
    accepted = finetune(minimum)
    assert accepted.returncode == 0, accepted.stderr
    assert "done: 1 steps" in accepted.stderr


def test_unified_memory_is_one_budget_the_gpu_minimum_plus_nothing(cli):
    args = ("7b", "--compute-dtype", "fp16", "--batch-size", "1", "--seq-len", "512")
    unified = plan_json(cli, *args, "--unified")
    assert unified["device"] == "mps" and unified["unified"] and unified["gpu_memory"] is None
    assert unified == plan_json(cli, *args, "--device", "mps")
    cuda = plan_json(cli, *args, "--device", "cuda")
    for u, c in zip(unified["configs"], cuda["configs"]):
        # the same working set; cuda adds the pinned staging of reads and writes on the host, mps has none
        assert u["min_gpu_memory"] is None
        assert u["min_memory"] == c["min_gpu_memory"]
        assert c["min_memory"] > 1
    sgd = row(unified, "sgd")["min_memory"]
    assert row(plan_json(cli, *args, "--unified", "--memory", sgd), "sgd")["fits"] is True
    below = row(plan_json(cli, *args, "--unified", "--memory", sgd - 1), "sgd")
    assert below["fits"] is False and "(the minimum: " in below["refused"]


def test_70b_fits_a_16gb_macs_12gib_streaming_each_weight(cli):
    p = plan_json(cli, "70b", "--unified", "--memory", "12G", "--batch-size", "1", "--seq-len", "512")
    sgd = row(p, "sgd")
    assert sgd["fits"] and sgd["unit"] == "each weight"  # whole blocks would not fit 12 GiB
    assert sgd["min_memory"] <= 12 << 30 and not sgd["resident"]
    n = p["model"]["parameters"]
    assert n == model_param_count(preset_args("70b"))["total"]
    # streamed from the SSD: every weight read twice (forward, backward) but what 12 GiB keep, and written once
    store = p["model"]["store_bytes"]
    assert 2 * store - (12 << 30) <= sgd["bytes_read"] < 2 * store and sgd["bytes_written"] >= store
    assert row(p, "lora")["bytes_written"] == 0
    assert row(p, "adamw")["disk"]["optimizer_state"] == 8 * n


def test_a_model_that_fits_is_read_once_and_written_at_commits(cli, store_fp32):
    p = plan_json(cli, store_fp32, "--device", "cpu", "--memory", "2G", *STEP)
    for name in ("sgd", "adamw"):
        r = row(p, name)
        assert r["fits"] and r["unit"] == "whole blocks" and r["resident"]
        assert r["bytes_read"] == 0 and r["bytes_written"] == 0
    tight = plan_json(cli, store_fp32, "--device", "cpu", *STEP)  # at the minimum: streamed
    assert row(tight, "sgd")["bytes_written"] >= p["model"]["store_bytes"]


def test_disk_is_the_store_its_state_and_a_steps_new_copies(cli):
    p = plan_json(cli, "7b", "--device", "cpu", "--memory", "64G", "--optimizer", "lion", "--master-weights", "fp32")
    store, n = p["model"]["store_bytes"], p["model"]["parameters"]
    assert store == 2 * n  # bf16
    for name, per_weight in (("sgd", 0), ("adamw", 8), ("lion", 4)):
        d = row(p, name)["disk"]
        assert d["optimizer_state"] == per_weight * n and d["master_weights"] == 4 * n
        assert d["step_free"] >= store + d["optimizer_state"] + d["master_weights"]
        assert d["total"] == store + d["optimizer_state"] + d["master_weights"] + d["step_free"]
    assert row(p, "lora")["disk"]["optimizer_state"] == 0 and row(p, "lora")["disk"]["master_weights"] == 0


def test_sources_before_the_download(cli, tmp_path, tiny_fp32):
    """A Hugging Face folder with config.json alone, a Meta folder with params.json alone: 7B's shapes."""
    args = preset_args("7b")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(meta_params(args)))
    preset = plan_json(cli, "7b", "--device", "cpu")
    for folder, dtype in ((hf, "fp16"), (meta, "bf16")):
        p = plan_json(cli, folder, "--device", "cpu", "--dtype", "bf16")
        assert p["model"]["parameters"] == preset["model"]["parameters"]
        assert p["configs"] == preset["configs"]
        assert plan_json(cli, folder, "--device", "cpu")["model"]["store_dtype"] == dtype
    # with the weights there: their dtype (the embeddings', as prepare takes it), only the headers read
    save_file({"model.embed_tokens.weight": torch.zeros(4, 8, dtype=torch.float32)}, str(hf / "model.safetensors"))
    assert plan_json(cli, hf, "--device", "cpu")["model"]["store_dtype"] == "fp32"
    assert plan_json(cli, tiny_fp32, "--device", "cpu")["model"]["store_dtype"] == "fp32"


def test_the_estimate_is_the_roofline_bound_of_benchs_cached_limits(cli, machine_cache):
    args = ("7b", "--device", "cpu", "--memory", "8G", "--batch-size", "2", "--seq-len", "64")
    p = plan_json(cli, *args)
    assert p["machine"] is None and all(r["estimate_seconds"] is None for r in p["configs"])
    assert "slowllama bench" in " ".join(p["notes"])
    record = {"disk_read_gbps": 2.0, "disk_write_gbps": 1.0, "page_cache_read_gbps": 10.0, "h2d_gbps": None,
              "d2h_gbps": None, "matmul_tflops": 1.0, "matmul_dtype": "fp32", "device": "cpu"}
    save_machine(machine_kind("cpu", "fp32"), record)
    assert load_machines(machine_cache)["cpu/fp32"]["disk_read_gbps"] == 2.0
    p = plan_json(cli, *args)
    for r in p["configs"]:
        storage = r["bytes_read"] / 2e9 + r["bytes_written"] / 1e9
        assert r["tier_seconds"]["storage"] == pytest.approx(storage)
        assert r["estimate_seconds"] == pytest.approx(max(storage, r["tier_seconds"]["compute"]))
    text = cli("plan", *args)
    assert text.returncode == 0 and "estimate" in text.stdout and " s (storage)" in text.stdout


def test_the_table(cli, store_fp32):
    proc = cli("plan", store_fp32, "--device", "cpu", "--memory", "1G")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("full FT, SGD") and "fits: whole blocks, resident" in line for line in lines)
    assert any(line.startswith("LoRA") for line in lines)


@pytest.mark.parametrize("args,fragments", [
    (("{empty}",), ("not a model",)),
    (("99b",), ("99b", "not a preset", "7b")),
    (("7b", "--memory", "12Q"), ("--memory", "12Q")),
    (("7b", "--device", "cuda", "--memory", "8G", "--gpu-memory", "lots"), ("--gpu-memory", "lots")),
    (("7b", "--device", "cpu", "--memory", "100M"), ("--memory: 100.0 MiB is below 1.6 GiB", "the minimum", "LoRA")),
    (("7b", "--device", "cuda", "--memory", "8G", "--gpu-memory", "512M"), ("--gpu-memory: 512.0 MiB is below",)),
    (("7b", "--device", "cpu", "--gpu-memory", "8G"), ("--gpu-memory", "--memory")),
    (("7b", "--unified", "--gpu-memory", "8G"), ("--gpu-memory", "--memory")),
    (("7b", "--device", "mps", "--memory", "8G", "--gpu-memory", "8G"), ("--gpu-memory", "unified")),
    (("7b", "--unified", "--device", "cuda"), ("--unified",)),
    (("7b", "--seq-len", "0"), ("--seq-len",)),
    (("7b", "--seq-len", "100000"), ("--seq-len", "max_seq_len")),
])
def test_bad_input_is_one_line(cli, tmp_path, args, fragments):
    """Each: one line naming the flag or file, exit non-zero, no traceback."""
    (tmp_path / "empty").mkdir()
    proc = cli("plan", *(a.format(empty=tmp_path / "empty") for a in args))
    assert_one_line_error(proc, *fragments)


@pytest.mark.parametrize("name,unit", [("sgd", "each weight"), ("adamw", "whole blocks"), ("adamw", "each weight"),
                                       ("lora", "whole blocks")])
def test_bytes_per_step_are_the_runs(cli, store_fp32, tmp_path, name, unit):
    """The replayed residency reads and writes what the run does in its steady state: step 3 (the first reads
    everything, and the second also reads ahead into the third; AdamW's state exists from the second on). SGD
    may write the embeddings' changed rows as a smaller patch."""
    args = (store_fp32, "--device", "cpu", *STEP)
    lo = next(u for u in row(plan_json(cli, *args), name)["units"] if u["unit"] == unit)["min_memory"]
    budget = lo + (256 << 10)  # a little room for resident modules
    planned = row(plan_json(cli, *args, "--memory", budget), name)
    assert planned["fits"] and planned["unit"] == unit and not planned["resident"]
    proc = cli("finetune", store_fp32, "--data", ALICE, "--device", "cpu", "--steps", "3", "--eval-every", "0",
               "--max-memory", budget, *STEP, "--json", *(
                   ["--lora-rank", "8", "--adapter-path", tmp_path / "adapters"] if name == "lora"
                   else ["--optimizer", name]))
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # the spills go to scratch/, not through the store's counters; file headers make the rest differ a little
    store_reads = planned["bytes_read"] - planned["spilled_bytes"]
    store_writes = planned["bytes_written"] - planned["spilled_bytes"]
    for step in steps[2:]:
        assert step["bytes_read"] == pytest.approx(store_reads, rel=0.01)
        if name == "lora":  # the base is frozen: nothing goes to the store
            assert step["bytes_written"] == store_writes == 0
        elif name == "sgd":
            assert step["bytes_written"] <= store_writes * 1.01
        else:
            assert step["bytes_written"] == pytest.approx(store_writes, rel=0.01)


def test_bench_keeps_its_measurements_for_plan(cli, tmp_path, machine_cache):
    measure_machine(tmp_path, torch.device("cpu"), torch.float32, 1 << 20, lambda m: None)
    kept = load_machines(machine_cache)["cpu/fp32"]
    assert kept["matmul_tflops"] > 0 and kept["disk_write_gbps"] > 0
    p = plan_json(cli, "7b", "--device", "cpu")
    assert p["machine"]["matmul_tflops"] == kept["matmul_tflops"]
    assert all(r["estimate_seconds"] > 0 for r in p["configs"])
    # another compute dtype was not measured: no estimate, and a line that says how to get one
    assert plan_json(cli, "7b", "--device", "cpu", "--compute-dtype", "bf16")["machine"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine gives --gpu-memory its default")
def test_cuda_without_a_gpu_here_needs_both_budgets(cli):
    assert_one_line_error(cli("plan", "7b", "--device", "cuda", "--memory", "8G"), "--gpu-memory", "needed")
    assert plan_json(cli, "7b", "--device", "cuda", "--memory", "8G", "--gpu-memory", "8G")["gpu_memory"] == 8 << 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_cuda_minimums_are_what_a_cuda_run_accepts(cli, store_fp32, name):
    """On a GPU of its own both budgets are minimums: the host's (pinned staging) and the GPU's (working set)."""
    r = row(plan_json(cli, store_fp32, "--device", "cuda", *STEP), name)
    host, gpu = r["min_memory"], r["min_gpu_memory"]

    def finetune(h, g):
        return cli("finetune", store_fp32, "--data", ALICE, "--device", "cuda", "--steps", "1", "--eval-every", "0",
                   "--max-memory", h, "--max-gpu-memory", g, "--optimizer", name, "--compile", "off", *STEP)

    assert_one_line_error(finetune(host - 1, gpu), "--max-memory", "(the minimum: ")
    assert_one_line_error(finetune(host, gpu - 1), "--max-gpu-memory", f"the {format_size(gpu)} ", "(the minimum: ")
    accepted = finetune(host, gpu)
    assert accepted.returncode == 0, accepted.stderr
