"""The load/store pipeline: read-ahead order, what stays resident, bytes counted, budgets obeyed, deferred writes."""

import json
import signal

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.formats.meta import prepare_meta
from slowllama.optim.adamw import AdamW
from slowllama.settings import FinetuneSettings
from slowllama.store.store import Store

from conftest import ALICE, FAULTS_RUNNER, assert_one_line_error, committed_step, run_cli
from reference import assert_state_close, store_state_dict

quiet = dict(log=lambda m: None, emit=lambda m: None)
BLOCKS = [f"layers.{i}" for i in range(4)]


def engine_with(store_path, module_budget: int):
    store = Store.open(store_path, writable=True, log=lambda m: None)
    cfg = EngineConfig(torch.device("cpu"), torch.float32, device_budget=module_budget)
    return store, OffloadedModel(store, cfg)


@pytest.fixture
def recorded(monkeypatch):
    reads = []
    original = Store.read

    def read(self, name, kind="modules", alloc=None):
        reads.append((kind, name))
        return original(self, name, kind, alloc)
    monkeypatch.setattr(Store, "read", read)
    return reads


def test_reads_follow_the_order_of_use(store_fp32, recorded):
    store, engine = engine_with(store_fp32, module_budget=0)  # nothing stays resident
    committed_step(store, engine, 1, 0.05)
    forward = ["tok_embeddings"] + BLOCKS
    backward = ["head"] + BLOCKS[::-1] + ["tok_embeddings"]
    assert [name for _, name in recorded[:11]] == forward + backward
    assert len(recorded) <= 11 + engine.cfg.lookahead  # and the next step's first modules, read ahead
    engine.pipe.close()
    store.close()


def test_the_last_modules_of_the_forward_pass_are_not_read_again(store_fp32, recorded):
    block = Store.open(store_fp32).module_bytes("layers.0")
    store, engine = engine_with(store_fp32, module_budget=int(2.5 * block))
    committed_step(store, engine, 1, 0.05)
    names = [name for _, name in recorded]
    turn = names.index("head")
    assert "layers.3" not in names[turn:] and "layers.2" not in names[turn:]  # still resident at the turn
    recorded.clear()
    committed_step(store, engine, 2, 0.05)
    names = [name for _, name in recorded]
    # the backward pass ended with layers.0 and the embeddings, the first the next forward pass needs
    assert names[:1] != ["tok_embeddings"] and "layers.0" not in names[:names.index("head")]
    assert engine.device_budget.peak <= engine.device_budget.limit + block
    engine.pipe.close()
    store.close()


@pytest.mark.parametrize("budget", ["none", "some", "all"])
def test_any_budget_gives_the_same_weights(tiny_fp32, tmp_path, budget):
    reference = prepare_meta(tiny_fp32, tmp_path / "reference", log=lambda m: None)
    store = prepare_meta(tiny_fp32, tmp_path / "store", log=lambda m: None)
    common = dict(data=str(ALICE), device="cpu", eval_every=0, log_every=0, steps=3, batch_size=2, accumulate=2,
                  seq_len=32, lr=1e-3, optimizer="adamw", dropout=0.1, save_every=1)
    finetune(FinetuneSettings(store=str(reference), **common), **quiet)
    block = Store.open(store).module_bytes("layers.0")
    size = {"none": 0, "some": 3 * block, "all": 100 * block}[budget]
    s = Store.open(store, writable=True, log=lambda m: None)
    engine = OffloadedModel(s, EngineConfig(torch.device("cpu"), torch.float32, device_budget=size, dropout=0.1),
                            optimizer=AdamW())
    for number in (1, 2, 3):
        committed_step(s, engine, number, 1e-3)
    engine.pipe.close()
    s.close()
    assert_state_close(store_state_dict(store), store_state_dict(reference), rtol=0, atol=0)


def test_a_model_that_fits_is_read_once_and_written_at_commit_points(store_fp32):
    proc = run_cli("finetune", store_fp32, "--data", ALICE, "--device", "cpu", "--steps", 5, "--batch-size", 2,
                   "--seq-len", 32, "--lr", 0.05, "--save-every", 2, "--log-every", 0, "--eval-every", 0, "--json",
                   check=0)
    assert "fits in memory" in proc.stderr
    steps = [json.loads(line) for line in proc.stdout.splitlines()]
    total = sum(Store.open(store_fp32).module_bytes(n) for n in ["tok_embeddings", "head"] + BLOCKS)
    assert steps[0]["bytes_read"] == total and all(m["bytes_read"] == 0 for m in steps[1:])
    assert [m["bytes_written"] > 0 for m in steps] == [False, True, False, True, True]  # steps 2, 4 and the last
    assert Store.open(store_fp32).step == 5


def test_a_kill_between_deferred_commits_loses_only_the_steps_since(tiny_fp32, tmp_path):
    straight = prepare_meta(tiny_fp32, tmp_path / "straight", log=lambda m: None)
    store = prepare_meta(tiny_fp32, tmp_path / "store", log=lambda m: None)
    args = ["--data", ALICE, "--device", "cpu", "--steps", 5, "--batch-size", 2, "--seq-len", 32, "--lr", 1e-3,
            "--optimizer", "adamw", "--save-every", 2, "--log-every", 0, "--eval-every", 0]
    env = {"OMP_NUM_THREADS": "1"}
    run_cli("finetune", straight, *args, env=env, check=0)
    # killed in the forward pass of step 4 (after 3 full steps): the store holds step 2, its last commit
    killed = run_cli("finetune", store, *args, env={**env, "SLOWLLAMA_FAULTS": "forward.module:16"},
                     module=FAULTS_RUNNER)
    assert killed.returncode == -signal.SIGKILL
    assert Store.open(store).step == 2
    run_cli("finetune", store, *args, env=env, check=0)
    assert_state_close(store_state_dict(store), store_state_dict(straight), rtol=0, atol=0)


def test_a_budget_below_the_working_set_is_refused(store_fp32):
    assert_one_line_error(run_cli("finetune", store_fp32, "--data", ALICE, "--max-memory", "1M"),
                          "--max-memory", "below", "need in flight")
    assert Store.open(store_fp32).step == 0
