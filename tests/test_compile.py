"""--compile: training's blocks through torch.compile train as eager blocks do (in-memory autograd)."""

import pytest
import torch

from conftest import ALICE
from reference import assert_state_close, meta_model, store_state_dict
from test_training import reference_model
from slowllama.settings import FinetuneSettings
from slowllama.train import finetune


def run(store, **kw) -> list[str]:
    logs = []
    finetune(FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, compile="on", **kw),
             log=logs.append, emit=lambda m: None)
    return logs


def test_compiled_blocks_train_like_in_memory(tiny_fp32, store_fp32):
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    logs = run(store_fp32, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=0.05)
    assert not any("--compile" in line for line in logs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the blocks did run compiled
    expected = reference_model(tiny_fp32, store_fp32, 3, 2, 2, 32, 0.05).state_dict()
    # fused kernels sum in other orders than eager ones: fp32 rounding, not another computation
    assert_state_close(store_state_dict(store_fp32), expected, rtol=1e-4, atol=1e-6)
    # and the blocks did move (a compiled graph that dropped the update would fail above, not here)
    before = meta_model(tiny_fp32).state_dict()
    assert not torch.equal(before["layers.2.attention.wq.weight"], store_state_dict(store_fp32)["layers.2.attention.wq.weight"])


def test_compile_with_dropout_runs_eager_and_says_so(tiny_fp32, store_fp32):
    logs = run(store_fp32, steps=2, batch_size=2, seq_len=32, lr=0.05, dropout=0.2, seed=3)
    assert any("--compile: blocks run eager with --dropout" in line for line in logs)
    expected = reference_model(tiny_fp32, store_fp32, 2, 2, 1, 32, 0.05, seed=3, dropout=0.2).state_dict()
    assert_state_close(store_state_dict(store_fp32), expected)


def failing_compile(*args):
    raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler\nlong inductor report ...")


def test_a_failed_compile_falls_back_to_eager_blocks_under_auto_and_is_an_error_under_on(tiny_fp32):
    from slowllama.compiled import CompiledBlocks
    from slowllama.errors import SlowllamaError
    from slowllama.model import rope_tables

    model = meta_model(tiny_fp32)
    block, args = model.layers[0], model.args
    x = torch.randn(2, 8, args.dim)
    cos, sin = rope_tables(args, 0, 8)
    said = []
    auto = CompiledBlocks(args, on_failure=said.append)
    auto.run = failing_compile
    torch.testing.assert_close(auto(block, x, cos, sin), block(x, cos, sin), rtol=0, atol=0)
    auto(block, x, cos, sin)  # no second attempt, no second message
    assert said == ["--compile auto: torch.compile failed on this machine (no working C++ compiler); blocks run eager"]
    on = CompiledBlocks(args)
    on.run = failing_compile
    with pytest.raises(SlowllamaError, match="--compile on: torch.compile failed on this machine "
                                             r"\(no working C\+\+ compiler\); use --compile off"):
        on(block, x, cos, sin)
