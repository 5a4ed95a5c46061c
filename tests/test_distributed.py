"""Several ranks under torchrun (gloo, on the CPU): the weights and moments of one process, each rank writing only
the modules it owns, crash safety, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.engine.owners import assign_owners
from slowllama.model.shapes import module_names
from slowllama.store.adapters import AdapterFolder
from slowllama.store.manifest import KINDS
from slowllama.formats.convert import prepare
from slowllama.store.quantized import Quantization
from slowllama.store.safetensors_io import read_file
from slowllama.store.state_parts import part_module
from slowllama.store.store import Store

from conftest import ALICE, FAULTS_RUNNER
from crashes import (ONE_THREAD, assert_bit_identical, assert_clean, fresh_store, in_one_thread, settings, state,
                     streaming_budget)

COMMON = ["--device", "cpu", "--steps", "3", "--batch-size", "2", "--accumulate", "2", "--seq-len", "16",
          "--seed", "3", "--log-every", "0", "--eval-every", "0", "--data", str(ALICE)]
# rank 0 evaluates at step 2 and 3: the modules rank 1 owns from the store (streaming: committed at every step) or
# from rank 0's copies of them (resident: the store is written at the end only)
EVAL = ["--val-split", "0.2", "--eval-every", "2"]
RUNS = {
    # streaming: every module read, reduced, updated and written at every step; dropout masks match
    # the single process's because each rank's microbatches are whole microbatches of its step
    "sgd-streaming": COMMON + EVAL + ["--lr", "0.05", "--dropout", "0.1",
                                      "--max-memory", streaming_budget(False, ranks=2)],
    # resident: the model stays in memory, the other rank keeps a copy updated by broadcast
    "adamw-resident": COMMON + EVAL + ["--optimizer", "adamw", "--lr", "1e-3", "--grad-clip", "0.05", "--clip-norm",
                                       "exact", "--weight-decay", "0.01"],
    "adamw-streaming": COMMON + ["--optimizer", "adamw", "--lr", "1e-3",
                                 "--max-memory", streaming_budget(True, ranks=2)],
}


def torchrun(store: Path, args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 300,
             module: str = "slowllama"):
    """`torchrun --nproc-per-node N -m slowllama finetune STORE ARGS` (or `-m FAULTS_RUNNER`) in a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, "finetune", str(store), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", **(env or {})})


def single_process(store: Path, args: list[str]) -> None:
    in_one_thread(finetune, settings(store, args), log=lambda m: None, emit=lambda m: None)


def assert_close_states(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, t in expected.items():
        torch.testing.assert_close(actual[key], t, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def owned_files(store: Path, gen: int, world: int = 2) -> list[list[dict[str, int]]]:
    """For each rank, for each entry the manifest has of the modules it owns (weights, state): {file: bytes} of its
    files of generation `gen` (its module file, or the row patch of an SGD step's embeddings)."""
    s = Store.open(store)
    owners = assign_owners([(n, s.module_bytes(n)) for n in module_names(s.args)], world)
    out = [[] for _ in range(world)]
    for kind in KINDS:
        for name, info in s.manifest.files.get(kind, {}).items():
            if part_module(name) in owners:
                out[owners[part_module(name)]].append({f.file: f.bytes for f in (info, *info.rows)
                                                       if f.file.split("@")[1].split(".")[0] == str(gen)})
    return out


def assert_each_rank_wrote_its_own_modules(store: Path, gen: int) -> None:
    """Every entry is new (written by the last commit, whose files are of generation `gen`), and rank 0 wrote
    exactly its own: the bytes it wrote in the last step are those of its modules' new files (metrics.jsonl counts
    rank 0's), so rank 1 wrote the rest."""
    shares = owned_files(store, gen)
    assert all(shares), shares  # both ranks own modules
    assert all(entry for share in shares for entry in share), shares  # each with a file of the last commit
    metrics = [json.loads(line) for line in (store / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bytes_written"] == sum(b for entry in shares[0] for b in entry.values())


def metrics(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "run" / "metrics.jsonl").read_text().splitlines()]


_two_ranks: dict[str, dict] = {}
_two_ranks_metrics: dict[str, list[dict]] = {}


def two_ranks(run: str, tmp_path_factory) -> dict:
    """The whole state of a store after an uninterrupted 2-rank run (once per session)."""
    if run not in _two_ranks:
        store = fresh_store(tmp_path_factory, tmp_path_factory.mktemp("two-ranks") / "store")
        # NCCL asked for on CPUs: gloo, with a message
        proc = torchrun(store, RUNS[run] + ["--dist-backend", "nccl"])
        assert proc.returncode == 0, proc.stderr
        assert "torchrun: 2 ranks, gloo" in proc.stderr
        assert ("--dist-backend nccl: NCCL needs GPUs and these ranks compute on the CPU; falling back to gloo"
                in proc.stderr)
        assert Store.open(store).step == 3
        assert_clean(store)  # the old files each rank replaced are gone
        # (a resident model is written once, at the run's end: files of generation 1)
        assert_each_rank_wrote_its_own_modules(store, 1 if "resident" in run else 3)
        _two_ranks[run], _two_ranks_metrics[run] = state(store), metrics(store)
    return _two_ranks[run]


@pytest.mark.parametrize("run", list(RUNS))
def test_two_ranks_give_the_weights_of_one_process(run, tmp_path, tmp_path_factory):
    one = fresh_store(tmp_path_factory, tmp_path / "one")
    single_process(one, RUNS[run])
    two = two_ranks(run, tmp_path_factory)
    assert any(kind == "optim" for kind, _, _ in two) == ("adamw" in run)  # AdamW's moments are compared too
    assert_close_states(two, state(one))  # weights and AdamW state, every tensor
    for ours, theirs in zip(_two_ranks_metrics[run], metrics(one), strict=True):  # loss, norm, rank 0's eval
        for key in ("loss", "grad_norm", "eval_loss"):
            assert (key in ours) == (key in theirs), key
            if key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["step"], key)
    assert [m["step"] for m in metrics(one) if "eval_loss" in m] == ([2, 3] if "--val-split" in RUNS[run] else [])


def test_two_ranks_train_lora_adapters_like_one_process(tmp_path, tmp_path_factory):
    base = fresh_store(tmp_path_factory, tmp_path / "base")
    before = state(base)
    args = COMMON + ["--lora-rank", "4", "--lr", "1e-3", "--lora-targets", "wq,wv,w2"]
    single_process(base, args + ["--adapter-path", str(tmp_path / "one")])
    proc = torchrun(base, args + ["--adapter-path", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr
    one, two = (read_file(AdapterFolder(tmp_path / name).path / "adapters.safetensors") for name in ("one", "two"))
    assert_close_states(two, one)
    assert_bit_identical(state(base), before)  # the base is only read


@pytest.mark.parametrize("budget", ["resident", "streaming"])
def test_two_ranks_train_lora_on_an_nf4_base_like_one_process(tiny_fp32, tmp_path, budget):
    # the packed weights go from their owner to the other rank as the store holds them (uint8), each time they are
    # used when streaming, once when resident
    base = prepare(tiny_fp32, tmp_path / "nf4", quantization=Quantization(double_quant=True), log=lambda m: None)
    before = state(base)
    args = COMMON + ["--lora-rank", "4", "--lr", "1e-3", "--lora-targets", "wq,wk,w2"]
    if budget == "streaming":  # just above what two ranks need in flight: their modules stream
        args += ["--max-memory", "5000000"]
    single_process(base, args + ["--adapter-path", str(tmp_path / "one")])
    proc = torchrun(base, args + ["--adapter-path", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr
    how = "keeps a copy of" if budget == "resident" else "gets, as they are used,"
    assert f"every rank {how} the others' modules" in proc.stderr
    one, two = (read_file(AdapterFolder(tmp_path / name).path / "adapters.safetensors") for name in ("one", "two"))
    assert_close_states(two, one)
    assert_bit_identical(state(base), before)


@pytest.mark.parametrize("rank, fault", [
    (1, "backward.module:6"),  # the other rank dies in step 2's backward, between module writes of rank 0
    (0, "store.commit.before_rename:2"),  # rank 0 dies during step 2's commit
    (1, "store.write.after:15"),  # rank 1 dies between the files of its modules in step 2 (it writes 13 a step)
    (1, "store.adopt:2"),  # rank 1 dies once rank 0 committed step 2, before it deletes the files it replaced
    (0, "store.commit.after_rename:2"),  # rank 0 dies once it committed step 2, before rank 1 hears of it
])
def test_a_rank_killed_mid_step_leaves_the_store_committed_and_resumes(rank, fault, tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    killed = torchrun(store, RUNS["adamw-streaming"], env={"SLOWLLAMA_FAULTS": fault,
                                                           "SLOWLLAMA_FAULTS_RANK": str(rank)},
                      module=FAULTS_RUNNER)
    assert killed.returncode != 0
    Store.open(store, writable=True, log=lambda m: None).close()  # what the next start does first: roll back
    committed = 2 if fault.startswith(("store.adopt", "store.commit.after_rename")) else 1
    assert Store.open(store).step == committed
    assert_clean(store)
    resumed = torchrun(store, RUNS["adamw-streaming"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming the run at step {committed} of 3" in resumed.stderr
    assert_bit_identical(state(store), two_ranks("adamw-streaming", tmp_path_factory))


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("slowllama finetune: error")]


def test_a_nan_loss_on_every_rank_commits_the_last_good_step_of_a_resident_model(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    # resident, written every 10 steps: step 1 stays in memory; a huge lr makes step 2's loss NaN on both ranks,
    # which commit step 1 together (each rank its own modules) before they stop
    proc = torchrun(store, COMMON + ["--lr", "1e30", "--save-every", "10"])
    assert proc.returncode != 0
    assert error_lines(proc) == ["slowllama finetune: error: step 2: the loss is nan; nothing of this step was "
                                 "written (try a lower --lr)"], proc.stderr
    assert Store.open(store).step == 1
    assert_clean(store)
    assert all(entry for share in owned_files(store, 1) for entry in share)  # every module of step 1 is in


def test_a_global_batch_that_does_not_divide_among_the_ranks_is_refused(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    proc = torchrun(store, COMMON + ["--batch-size", "3", "--accumulate", "1"])
    assert proc.returncode != 0
    assert error_lines(proc) == ["slowllama finetune: error: --batch-size x --accumulate: the global batch of 3 "
                                 "windows does not divide among 2 ranks"], proc.stderr
    assert Store.open(store).step == 0


def _check_same(rank: int, init_file: str, results: str) -> None:
    from slowllama.engine.fleet import Fleet
    from slowllama.errors import SlowllamaError

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    fleet = Fleet(rank, 2, torch.device("cpu"))
    try:
        fleet.check_same({"lr": 0.001 if rank == 0 else 0.002, "steps": 3}, "same data")
        outcome = "passed"
    except SlowllamaError as e:
        outcome = str(e)
    try:
        fleet.check_same({"lr": 0.001, "steps": 3}, f"data of rank {rank}")
        outcome += "\npassed"
    except SlowllamaError as e:
        outcome += "\n" + str(e)
    fleet.check_same({"lr": 0.001}, "same data")  # agreeing ranks pass
    Path(results, str(rank)).write_text(outcome)
    fleet.close()


def test_mismatched_settings_between_ranks_are_named(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_check_same, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        lr, data = (tmp_path / str(rank)).read_text().splitlines()
        assert lr == "--lr: differs between ranks (rank 0: 0.001, rank 1: 0.002)"
        assert data == "--data: rank 1 read other tokens than rank 0 (the data files differ between ranks)"


def test_each_rank_spills_activations_to_its_own_scratch_folder(tmp_path, tmp_path_factory):
    from slowllama.commands.common import make_engine
    from slowllama.engine.activations import Budget
    from slowllama.engine.fleet import Fleet

    store = Store.open(fresh_store(tmp_path_factory, tmp_path / "store"))
    s = settings(store.path, COMMON)
    folders = set()
    for rank in (0, 1):
        engine = make_engine(store, s, fleet=Fleet(rank, 2, torch.device("cpu")))
        engine.activation_budget = Budget(0, "no room")
        acts = engine.activations()
        acts.put((0, 0), torch.ones(3))  # no room in memory: spilled
        folders |= {p.parent for p in acts.scratch.glob("act_*")}
        assert torch.equal(acts.pop((0, 0)), torch.ones(3))
    assert folders == {store.scratch / "rank0", store.scratch / "rank1"}


def test_sigterm_to_one_rank_stops_every_rank_after_the_step_in_progress(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    # rank 1 gets SIGTERM in step 2's backward: both ranks finish step 2, commit it and stop
    stopped = torchrun(store, RUNS["adamw-streaming"], env={"SLOWLLAMA_FAULTS": "backward.module:5:sigterm",
                                                            "SLOWLLAMA_FAULTS_RANK": "1"}, module=FAULTS_RUNNER)
    assert stopped.returncode != 0
    assert "stopped after step 2 of 3; the store is at step 2 (step 2 of the run), committed" in stopped.stderr, \
        stopped.stderr
    assert Store.open(store).step == 2
    assert_clean(store)
    resumed = torchrun(store, RUNS["adamw-streaming"])
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_identical(state(store), two_ranks("adamw-streaming", tmp_path_factory))


def test_bench_under_torchrun_splits_each_step_between_the_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "slowllama",
           "bench", "--preset", "tiny", "--layers", "2", "--batch-size", "2", "--accumulate", "2", "--seq-len", "32",
           "--steps", "2", "--probe-size", "4M", "--device", "cpu", "--store-dir", str(tmp_path / "s"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(objs) == 3, proc.stdout  # rank 0 alone prints: 2 steps and the summary
    assert [o["tokens"] for o in objs[:2]] == [2 * 2 * 32] * 2  # the whole step's tokens
    assert objs[2]["ranks"] == 2 and objs[2]["machine"]["ranks"] == 2
    assert ("2 ranks, each owning a share of the modules (it reads, updates and writes them); every rank keeps a "
            "copy of the others' modules") in proc.stderr
    assert Store.open(tmp_path / "s").step == 2  # rank 0 committed both steps
