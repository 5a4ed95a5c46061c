"""Blocks that keep their forward graph (no recompute in the backward) train exactly as recomputed ones do."""

import pytest
import torch
from safetensors.torch import load_file

from slowllama.commands.finetune import finetune
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.engine.residency import kept_block_bytes, train_plan
from slowllama.formats.meta import prepare_meta
from slowllama.model.shapes import module_names
from slowllama.optim.adamw import AdamW
from slowllama.settings import FinetuneSettings
from slowllama.store.store import Store

from conftest import ALICE, committed_step
from reference import store_state_dict


def run(store, logs, **kw):
    s = FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, steps=2, batch_size=2,
                         seq_len=32, **kw)
    finetune(s, log=logs.append, emit=lambda m: None)


def optimizer_state(store_path):
    store = Store.open(store_path)
    return {f"{name}/{k}": t for name in module_names(store.args) if store.has(name, "optim")
            for k, t in store.read_state(name, "optim").items()}


def assert_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


CASES = {
    "sgd": dict(lr=0.05),
    "adamw-accumulated": dict(lr=1e-3, optimizer="adamw", accumulate=2),
    "dropout": dict(lr=0.05, dropout=0.2),
    "lora": dict(lr=1e-2, lora_rank=4, lora_targets="wq,wk,wv,wo,w1,w2,w3", lora_dropout=0.1, grad_clip=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_graphs_train_exactly_as_recompute(tiny_fp32, tmp_path, case):
    kw = dict(CASES[case])
    results = {}
    for mode in ("auto", "always"):
        store = prepare_meta(tiny_fp32, tmp_path / mode / "store", log=lambda m: None)
        logs = []
        extra = dict(adapter_path=str(tmp_path / mode / "adapters")) if "lora_rank" in kw else {}
        run(store, logs, recompute=mode, **kw, **extra)
        kept = [m for m in logs if "keep their forward pass's graph" in m]
        assert bool(kept) == (mode == "auto"), logs
        if "lora_rank" in kw:
            results[mode] = load_file(tmp_path / mode / "adapters" / "adapters.safetensors")
        else:
            results[mode] = store_state_dict(store) | optimizer_state(store)
    assert results["auto"]
    assert_equal(results["auto"], results["always"])


def test_a_budget_for_some_graphs_keeps_the_last_blocks(tiny_fp32, tmp_path):
    # an activation budget for the cached inputs of every block and the graphs of 2 of them
    stores = {}
    for count in (0, 2, 4):
        path = prepare_meta(tiny_fp32, tmp_path / str(count), log=lambda m: None)
        store = Store.open(path, writable=True, log=lambda m: None)
        args = store.args
        per_input = 2 * 2 * 32 * args.dim * 4  # 2 microbatches of 2 windows of 32 tokens, fp32
        per_graph = kept_block_bytes(args, torch.float32, torch.float32, 2, 32, 2)
        budget = args.n_layers * per_input + count * (per_graph - per_input)
        engine = OffloadedModel(store, EngineConfig(torch.device("cpu"), torch.float32, activation_budget=budget),
                                optimizer=AdamW())
        assert engine.kept_graph_count(2, 32, 2) == min(count, args.n_layers)
        for number in (1, 2):
            committed_step(store, engine, number, 1e-3)
        assert engine.activation_budget.used == 0  # the graphs' bytes are given back
        store.close()
        stores[count] = store_state_dict(path) | optimizer_state(path)
    assert_equal(stores[2], stores[0])
    assert_equal(stores[4], stores[0])


def test_lora_plan_reads_no_weights_for_kept_blocks(tiny_fp32, tmp_path):
    store = Store.open(prepare_meta(tiny_fp32, tmp_path / "s", log=lambda m: None))
    plan = train_plan(store.args, store.state_parts, [], embeddings_backward=False, graphs=2)
    backward = plan[1 + store.args.n_layers:]
    blocks = [name for _, name in backward if name.startswith("layers.")]
    assert blocks == [f"layers.{i}" for i in reversed(range(store.args.n_layers - 2))]
    # full fine-tuning still asks for every block's weights: its update reads them
    full = train_plan(store.args, store.state_parts, [], embeddings_backward=True, graphs=2)
    assert [n for _, n in full].count(f"layers.{store.args.n_layers - 1}") == 2
