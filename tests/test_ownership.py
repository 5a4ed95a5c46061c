"""Which rank owns which module: every module owned once, the shares balanced by bytes, the same table everywhere;
each rank's plan of use; whether the other ranks see rank 0's very store folder (else rank 0 owns every module)."""

from __future__ import annotations

import pytest

from slowllama.engine.owners import assign_owners


def shares(owners: dict[str, int], sizes: dict[str, int], world: int) -> list[int]:
    load = [0] * world
    for name, rank in owners.items():
        load[rank] += sizes[name]
    return load


def test_one_rank_owns_everything():
    assert assign_owners([("tok_embeddings", 5), ("layers.0", 7), ("head", 5)], 1) == {
        "tok_embeddings": 0, "layers.0": 0, "head": 0}


def test_equal_blocks_go_round_robin():
    sizes = [(f"layers.{i}", 10) for i in range(6)]
    assert list(assign_owners(sizes, 3).values()) == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_7b_like_model_is_shared_within_one_module_of_balance(world):
    # embeddings and head of 131M weights, 32 blocks of 202M: bytes at 2 per weight
    sizes = [("tok_embeddings", 262_144_000)] + [(f"layers.{i}", 404_766_720) for i in range(32)] + [
        ("head", 262_152_192)]
    owners = assign_owners(sizes, world)
    assert list(owners) == [name for name, _ in sizes]  # every module, once
    load = shares(owners, dict(sizes), world)
    assert max(load) - min(load) <= max(size for _, size in sizes)
    assert all(load)  # every rank streams a share
    assert owners == assign_owners(sizes, world)  # a pure function: every rank finds the same table


def test_more_ranks_than_modules_leaves_some_ranks_without_a_share():
    owners = assign_owners([("tok_embeddings", 3), ("head", 3)], 4)
    assert owners == {"tok_embeddings": 0, "head": 1}


def test_a_world_below_one_is_refused():
    with pytest.raises(ValueError):
        assign_owners([("head", 1)], 0)


def test_deferred_updates_put_each_update_after_the_next_modules_weights():
    from slowllama.engine.residency import train_plan
    from slowllama.model.args import ModelArgs
    from slowllama.model.families import PRESETS
    from slowllama.model.shapes import module_shapes
    from slowllama.store.state_parts import state_parts

    args = ModelArgs(**{**PRESETS["tiny"], "n_layers": 2, "dim": 64})

    def parts(name):
        return state_parts(name, module_shapes(args, name), 1 << 12)

    def update(name):
        return [("modules", name)] + [("optim", p.name) for p in parts(name)]

    plain = train_plan(args, parts, ["optim"], embeddings_backward=True)
    next_one = train_plan(args, parts, ["optim"], embeddings_backward=True, deferred_updates=1)
    ahead = train_plan(args, parts, ["optim"], embeddings_backward=True, deferred_updates=2)
    forward = [("modules", n) for n in ("tok_embeddings", "layers.0", "layers.1")]
    assert plain[:3] == next_one[:3] == ahead[:3] == forward
    assert plain[3:] == update("head") + update("layers.1") + update("layers.0") + update("tok_embeddings")
    # head, block 1, block 0, embeddings: each module's update once the next module's weights are asked for
    head, l1, l0, emb = (("modules", n) for n in ("head", "layers.1", "layers.0", "tok_embeddings"))
    assert next_one[3:] == ([head, l1] + update("head") + [l0] + update("layers.1") + [emb] + update("layers.0")
                            + update("tok_embeddings"))
    # ... and the one after it too, which is asked for (and broadcast) while the next one computes
    assert ahead[3:] == [head, l1, l0] + update("head") + [emb] + update("layers.1") + update("layers.0") + update(
        "tok_embeddings")


def test_a_steps_uses_are_the_modules_of_its_plan_in_order():
    from slowllama.engine.residency import step_uses, train_plan
    from slowllama.model.args import ModelArgs
    from slowllama.model.families import PRESETS

    for tied in (False, True):
        args = ModelArgs(**{**PRESETS["tiny"], "n_layers": 3, "dim": 64, "tie_word_embeddings": tied})
        for full in (True, False):  # full fine-tuning, LoRA
            plan = train_plan(args, lambda n: [], [], embeddings_backward=full)
            assert step_uses(args, full) == [name for kind, name in plan]


def test_each_ranks_plan_holds_the_reads_and_writes_of_its_own_modules_only():
    import torch

    from slowllama.engine.fleet import Fleet
    from slowllama.engine.replicas import Replicas
    from slowllama.engine.residency import train_plan
    from slowllama.model.args import ModelArgs
    from slowllama.model.families import PRESETS
    from slowllama.model.shapes import module_names, module_shapes
    from slowllama.store.state_parts import part_module, state_parts

    args = ModelArgs(**{**PRESETS["tiny"], "n_layers": 4, "dim": 64})
    sizes = [(n, 4 * sum(torch.Size(s).numel() for s in module_shapes(args, n).values())) for n in module_names(args)]
    plan = train_plan(args, lambda n: state_parts(n, module_shapes(args, n), 1 << 12), ["optim", "master"],
                      embeddings_backward=True, deferred_updates=True)
    plans = [Replicas(Fleet(rank, 2), None, {}, torch.device("cpu"), sizes).plan(plan)
             for rank in (0, 1)]
    owners = assign_owners(sizes, 2)
    for rank, mine in enumerate(plans):
        assert mine and all(owners[part_module(name)] == rank for _, name in mine)
    assert sorted(plans[0] + plans[1]) == sorted(plan)  # every key on exactly one rank


def test_a_rank_sees_rank_0s_store_folder_by_its_lock_and_a_copy_is_not_it(store_fp32, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from slowllama.store.store import Store

    def locked_by(path, pid: int) -> bool:  # asked from another process, as another rank asks
        code = ("from slowllama.store.store import Store; "
                f"print(Store.open({str(path)!r}, follower=True).locked_by({pid}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return out.strip() == "True"

    store = Store.open(store_fp32, writable=True, log=lambda m: None)
    try:
        copy = tmp_path / "copy"
        shutil.copytree(store_fp32, copy)  # the lock file, with this pid in it, but held by nobody
        assert locked_by(store_fp32, os.getpid())
        assert not locked_by(copy, os.getpid())
        assert not locked_by(store_fp32, os.getpid() + 1)
        assert Store.open(copy, follower=True).holds_every_file()  # good enough to read (LoRA)
        next((copy / "modules").iterdir()).unlink()
        assert not Store.open(copy, follower=True).holds_every_file()
    finally:
        store.close()


def test_the_working_set_of_several_ranks_counts_the_module_sent_ahead_and_the_gradient_awaiting_its_reduce():
    import torch

    from slowllama.engine.residency import largest_unit_elements, working_bytes
    from slowllama.model.args import ModelArgs
    from slowllama.model.families import PRESETS

    args = ModelArgs(**{**PRESETS["tiny"], "n_layers": 2, "dim": 64})
    kw = dict(train=True, batch_size=2, seq_len=16, microbatches=2)
    p = largest_unit_elements(args)
    one, two = (working_bytes(args, torch.bfloat16, torch.bfloat16, ranks=r, **kw) for r in (1, 2))
    assert two - one == pytest.approx(1.2 * p * (2 + 4), abs=2)  # bf16 weights ahead, the fp32-or-wider gradient
    lora_one, lora_two = (working_bytes(args, torch.bfloat16, torch.bfloat16, lora=True, ranks=r, **kw) for r in (1, 2))
    assert lora_two - lora_one == pytest.approx(1.2 * p * 2, abs=2)  # LoRA: the frozen base's weights only
