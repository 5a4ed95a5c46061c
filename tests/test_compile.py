"""--compile: training's blocks through torch.compile train as eager blocks do (in-memory autograd)."""

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.engine.compiled import CompiledUpdates
from slowllama.optim.registry import make_optimizer
from slowllama.optim.rounding import hashed_bits, round_with_bits
from slowllama.settings import FinetuneSettings

from conftest import ALICE
from reference import assert_state_close, meta_model, store_state_dict
from test_training import reference_model


def run(store, **kw) -> list[str]:
    logs = []
    finetune(FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, compile="on", **kw),
             log=logs.append, emit=lambda m: None)
    return logs


@pytest.mark.parametrize("recompute", ["auto", "always"])  # the blocks keep their graphs / are recomputed
def test_compiled_blocks_train_like_in_memory(tiny_fp32, store_fp32, recompute):
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    logs = run(store_fp32, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=0.05, recompute=recompute)
    assert not any("--compile" in line for line in logs)
    assert any("blocks keep their forward pass's graph" in line for line in logs) == (recompute == "auto")
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
    from slowllama.engine.compiled import BlockTensors, CompiledBlocks
    from slowllama.errors import SlowllamaError
    from slowllama.model.layers import rope_tables

    model = meta_model(tiny_fp32)
    block, args = model.layers[0], model.args
    tensors = BlockTensors(dict(block.named_parameters()), {})
    x = torch.randn(2, 8, args.dim)
    cos, sin = rope_tables(args, 0, 8)
    said = []
    auto = CompiledBlocks(args, on_failure=said.append)
    auto.run = failing_compile
    torch.testing.assert_close(auto(tensors, x, cos, sin), block(x, cos, sin), rtol=0, atol=0)
    auto(tensors, x, cos, sin)  # no second attempt, no second message
    assert said == ["--compile auto: torch.compile failed on this machine (no working C++ compiler); blocks run eager"]
    on = CompiledBlocks(args)
    on.run = failing_compile
    with pytest.raises(SlowllamaError, match="--compile on: torch.compile failed on this machine "
                                             r"\(no working C\+\+ compiler\); use --compile off"):
        on(tensors, x, cos, sin)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lion"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_updates_do_the_arithmetic_of_the_eager_ones(optimizer, dtype):
    """One fused pass per weight = the optimizer's eager update and rounding, with the same hashed random bits."""
    torch.manual_seed(0)
    w = torch.randn(64, 48).to(dtype)
    g = torch.randn(64, 48).to(dtype) * 1e-2
    lr, coef = 1e-3, 0.5
    opt = make_optimizer(optimizer, weight_decay=0.1 if optimizer != "sgd" else None)
    state = opt.init_state({"w": w})
    if opt.stateful:  # a second update, from moments that are not zero
        if opt.counts_steps:
            state["step"] += 1
        state["w.exp_avg"].normal_(0, 1e-3)
        if "exp_avg_sq" in opt.state_names:
            state["w.exp_avg_sq"].uniform_(0, 1e-5)
    noise = torch.tensor([0x9E3779B9, 7 * 48], dtype=torch.int64)  # a key; the part starts at row 7 of its weight
    fused = CompiledUpdates(opt)
    number = state["step"].item() + 1 if opt.counts_steps else None
    got, new_state = fused(w, g, torch.tensor(coef), torch.tensor(opt.scalars(lr, number)),
                           tuple(state[f"w.{n}"] for n in opt.state_names), noise if dtype == torch.bfloat16 else None)
    w32 = {"w": w.float().clone()}  # (the eager update works in place)
    opt.update(w32, {"w": g.float() * coef}, state, lr)
    expected = round_with_bits(w32["w"], dtype, hashed_bits(noise, w.shape) if dtype == torch.bfloat16 else None)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    else:  # the same bf16 value, or (fp32 rounding differs in the last bit near a boundary) a neighbour
        assert (got != expected).float().mean() < 0.01
        step = (expected.float().abs() * 2 ** -7).clamp_min(1e-30)
        assert ((got.float() - expected.float()).abs() <= step).all()
    assert not torch.equal(got, w)  # it did update
    # lerp's m + w (g - m) cancels where g is near m: absolute errors at fp32's resolution of g
    atol = {"exp_avg": 1e-9, "exp_avg_sq": 1e-12}
    for name, t in zip(opt.state_names, new_state):
        torch.testing.assert_close(t, state[f"w.{name}"], rtol=1e-5, atol=atol[name])


def test_compiled_adamw_on_a_bf16_store_trains_like_eager(tiny_bf16, tmp_path):
    from slowllama.formats.meta import prepare_meta

    stores, graphs = {}, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for mode in ("on", "off"):
        stores[mode] = prepare_meta(tiny_bf16, tmp_path / mode, log=lambda m: None)
        finetune(FinetuneSettings(store=str(stores[mode]), data=str(ALICE), device="cpu", eval_every=0, compile=mode,
                                  steps=2, batch_size=2, seq_len=32, lr=1e-3, optimizer="adamw", grad_clip=1.0),
                 log=lambda m: None, emit=lambda m: None)
        if mode == "on":
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert graphs > 2  # the blocks make two graphs (forward, forward + backward); the rest are the updates
    on, off = store_state_dict(stores["on"]), store_state_dict(stores["off"])
    moved = 0
    for key in off:
        # stochastic rounding from other bits (compiled: hashed in the update; eager: a generator's) lands
        # each step on the same bf16 value or its neighbour, so the two runs stay within a bf16 step a
        # step; beyond that AdamW turns fp32 rounding differences in a near-zero gradient into up to lr
        ulp = on[key].float().abs() * 2 ** -7
        assert ((on[key].float() - off[key].float()).abs() <= 2 * (2e-3 + ulp)).all(), key
        differ = (on[key] != off[key]).float().mean()
        assert differ < 0.7, (key, differ)  # not unrelated weights: most land on the same value
        moved += int(not torch.equal(off[key], meta_model(tiny_bf16).state_dict()[key].to(off[key].dtype)))
    assert moved > len(off) // 2


@pytest.mark.parametrize("recompute", ["auto", "always"])
def test_compiled_lora_blocks_train_like_in_memory(tiny_fp32, store_fp32, tmp_path, recompute):
    import safetensors.torch as st

    from slowllama.data.windows import load_text
    from slowllama.model.lora import LoRAConfig
    from slowllama.model.tokenizer import load_tokenizer
    from reference import train_in_memory
    from test_lora import TARGET_LIST, in_memory_lora

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # SGD: the adapters' values carry their gradients' rounding as is (AdamW's first steps magnify it)
    logs = run(store_fp32, steps=2, batch_size=2, accumulate=2, seq_len=32, lr=0.5, lora_rank=4, lora_alpha=8.0,
               lora_targets=TARGET_LIST, adapter_path=str(tmp_path / "ad"), log_every=0, optimizer="sgd",
               recompute=recompute)
    assert not any("--compile" in line for line in logs), logs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the LoRA blocks did run compiled
    model, params = in_memory_lora(tiny_fp32, LoRAConfig(4, 8.0, 0.0, tuple(TARGET_LIST.split(","))), seed=0)
    opt = torch.optim.SGD(params.values(), lr=0.5)
    train_in_memory(model, load_text(ALICE, load_tokenizer(store_fp32)), 2, 2, 2, 32, 0.5, optimizer=opt)
    after = st.load_file(str(tmp_path / "ad" / "adapters.safetensors"))
    for key, p in params.items():
        torch.testing.assert_close(after[key], p.detach(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_compile_with_lora_dropout_runs_eager_and_says_so(store_fp32, tmp_path):
    logs = run(store_fp32, steps=1, batch_size=2, seq_len=32, lr=1e-2, lora_rank=4, lora_dropout=0.1,
               adapter_path=str(tmp_path / "ad"))
    assert any("--compile: LoRA blocks run eager with --lora-dropout" in line for line in logs)


@pytest.mark.parametrize("double_quant", [False, True])
def test_compiled_dequantization_gives_the_eager_bits(double_quant):
    from slowllama.engine.compiled import CompiledDequantize
    from slowllama.model import nf4

    torch.manual_seed(0)
    run = CompiledDequantize()
    for shape in [(64, 96), (33, 70), (128, 200)]:  # a last block padded, and more than 256 blocks
        packed = nf4.quantize(torch.randn(shape) * 0.02, double_quant)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(run(packed, shape, double_quant, dtype), nf4.dequantize(packed, shape, double_quant, dtype))
    assert not run.failed


def test_an_nf4_engine_dequantizes_compiled_under_compile_on(tiny_fp32, tmp_path):
    from slowllama.data.windows import load_text, microbatches, step_windows
    from slowllama.engine.chain import EngineConfig, OffloadedModel
    from slowllama.formats.convert import prepare
    from slowllama.model.tokenizer import load_tokenizer
    from slowllama.store.quantized import Quantization
    from slowllama.store.store import Store

    store = Store.open(prepare(tiny_fp32, tmp_path / "nf4", quantization=Quantization(), log=lambda m: None))
    x, y = step_windows(load_text(ALICE, load_tokenizer(store.path)), 0, 4, 32, "random", 0)
    losses = {}
    for mode in ("on", "off"):
        engine = OffloadedModel(store, EngineConfig(torch.device("cpu"), torch.float32, compile=mode))
        assert (engine.compiled_dequantize is not None) == (mode == "on")
        losses[mode] = engine.loss_sum(microbatches(x, y, 2))
    assert losses["on"] == losses["off"]  # eval's blocks run eager: the dequantized weights are the same bits


def test_compiled_lora_blocks_on_an_nf4_store_train_like_eager(tiny_fp32, tmp_path):
    """The packed weights go into the compiled block and are dequantized there: the adapters move as eager blocks
    (which dequantize each weight, then run the module) move them."""
    import safetensors.torch as st

    from slowllama.formats.convert import prepare
    from slowllama.store.quantized import Quantization

    store = prepare(tiny_fp32, tmp_path / "nf4", quantization=Quantization(double_quant=True), log=lambda m: None)
    adapters, graphs = {}, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for mode in ("on", "off"):  # (compiled: the blocks recomputed in the backward)
        finetune(FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, compile=mode,
                                  steps=2, batch_size=2, accumulate=2, seq_len=32, lr=0.5, optimizer="sgd",
                                  lora_rank=4, lora_alpha=8.0, lora_targets="wq,wv,w2",
                                  adapter_path=str(tmp_path / mode), log_every=0,
                                  recompute="always" if mode == "on" else "auto"),
                 log=lambda m: None, emit=lambda m: None)
        adapters[mode] = st.load_file(str(tmp_path / mode / "adapters.safetensors"))
        if mode == "on":
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the blocks did run compiled
    for key, expected in adapters["off"].items():
        torch.testing.assert_close(adapters["on"][key], expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in adapters["on"].items() if "lora_b" in k)
