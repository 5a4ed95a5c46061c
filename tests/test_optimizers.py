"""AdamW with offloaded state, schedules, gradient clipping, and exact updates of 16-bit weights."""

import math
import shutil

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.formats.meta import prepare_meta
from slowllama.model.tokenizer import load_tokenizer
from slowllama.optim.rounding import hashed_bits, round_to, round_with_key
from slowllama.optim.schedule import lr_at
from slowllama.settings import FinetuneSettings
from slowllama.store.state_parts import part_module
from slowllama.store.store import Store

from conftest import ALICE, assert_one_line_error, run_cli
from reference import assert_state_close, meta_model, store_state_dict, train_in_memory

quiet = dict(log=lambda m: None, emit=lambda m: None)


def run_finetune(store, **kw):
    s = FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", eval_every=0, **kw)
    return finetune(s, **quiet)


def alice(store):
    return load_text(ALICE, load_tokenizer(store))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_three_adamw_steps_equal_torch_adamw(tiny_fp32, store_fp32, weight_decay):
    run_finetune(store_fp32, steps=3, batch_size=2, accumulate=2, seq_len=32, lr=1e-3, optimizer="adamw",
                 adam_betas="0.8,0.95", adam_eps=1e-6, weight_decay=weight_decay)
    model = meta_model(tiny_fp32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    train_in_memory(model, alice(store_fp32), 3, 2, 2, 32, 1e-3, order="random", optimizer=opt)
    assert_state_close(store_state_dict(store_fp32), model.state_dict())
    # the state lives in the store beside each module: exp_avg, exp_avg_sq (fp32) and the step
    store = Store.open(store_fp32)
    state = store.read_state("layers.1", "optim")
    assert state["step"].item() == 3
    assert state["attention.wq.weight.exp_avg"].dtype == torch.float32
    expected = opt.state[model.layers[1].attention.wq.weight]["exp_avg_sq"]
    torch.testing.assert_close(state["attention.wq.weight.exp_avg_sq"], expected, rtol=1e-5, atol=1e-12)


def test_adamw_state_in_bf16(store_fp32):
    run_finetune(store_fp32, steps=2, batch_size=2, seq_len=32, lr=1e-3, optimizer="adamw", optim_dtype="bf16")
    state = Store.open(store_fp32).read_state("head", "optim")
    assert state["output.weight.exp_avg"].dtype == torch.bfloat16
    assert state["output.weight.exp_avg"].abs().sum() > 0


def test_resume_with_another_optim_dtype_casts_the_moments(store_fp32, tmp_path):
    """--optim-dtype changed on resume takes effect: the stored fp32 moments go on in bf16 (not silently fp32)."""
    other = tmp_path / "other"
    shutil.copytree(store_fp32, other)
    adamw = dict(batch_size=2, seq_len=32, lr=1e-3, optimizer="adamw")
    run_finetune(store_fp32, steps=3, **adamw)  # fp32 moments throughout
    run_finetune(other, steps=2, **adamw)
    run_finetune(other, steps=3, optim_dtype="bf16", **adamw)
    for name in {part_module(n) for n in Store.open(other).manifest.files["optim"]}:
        expected, state = Store.open(store_fp32).read_state(name, "optim"), Store.open(other).read_state(name, "optim")
        assert state["step"].item() == 3
        for key, t in state.items():
            if key != "step":
                assert t.dtype == torch.bfloat16, (name, key)
                torch.testing.assert_close(t.float(), expected[key], rtol=2e-2, atol=1e-2 * expected[key].abs().max().item())


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules_with_warmup_equal_lambda_lr(tiny_fp32, store_fp32, schedule):
    steps, warmup = 5, 2
    run_finetune(store_fp32, steps=steps, batch_size=2, seq_len=32, lr=2e-3, optimizer="adamw",
                 lr_schedule=schedule, warmup_steps=warmup)
    model = meta_model(tiny_fp32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)  # ours defaults to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(i + 1, steps, 1.0, schedule, warmup))

    class Stepper:  # step the scheduler after each optimizer step, like a training loop does
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            opt.step()
            sched.step()
    train_in_memory(model, alice(store_fp32), steps, 2, 1, 32, 2e-3, order="random", optimizer=Stepper())
    assert_state_close(store_state_dict(store_fp32), model.state_dict())


def test_lr_at_shapes():
    assert [lr_at(s, 10, 1.0, "constant", 4) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_at(10, 10, 1.0, "cosine", 0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(6, 10, 1.0, "linear", 2) == pytest.approx(0.5)


def global_norm(model):
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))


def test_exact_grad_clip_equals_clip_grad_norm(tiny_fp32, store_fp32):
    run_finetune(store_fp32, steps=3, batch_size=2, seq_len=32, lr=0.05, grad_clip=0.5, clip_norm="exact")
    model = meta_model(tiny_fp32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    class Clipped:
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            assert global_norm(model) > 0.5  # clipping does bite in this test
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
    train_in_memory(model, alice(store_fp32), 3, 2, 1, 32, 0.05, order="random", optimizer=Clipped())
    assert_state_close(store_state_dict(store_fp32), model.state_dict())


def test_previous_step_grad_clip(tiny_fp32, store_fp32):
    # step 1 measures its own norm first; later steps clip with the norm of the step before
    run_finetune(store_fp32, steps=3, batch_size=2, seq_len=32, lr=0.05, grad_clip=0.5)
    model = meta_model(tiny_fp32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    previous = []

    class PreviousClipped:
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            norm = global_norm(model)
            used = previous[-1] if previous else norm
            for p in model.parameters():
                p.grad.mul_(min(1.0, 0.5 / (used + 1e-6)))
            previous.append(norm)
            opt.step()
    train_in_memory(model, alice(store_fp32), 3, 2, 1, 32, 0.05, order="random", optimizer=PreviousClipped())
    assert_state_close(store_state_dict(store_fp32), model.state_dict())
    assert Store.open(store_fp32).manifest.run.grad_norm == pytest.approx(previous[-1], rel=1e-4)


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    base = torch.full((200_000,), 1.0)
    step = 2.0 ** -7  # bf16's resolution at 1.0
    w = base + 0.3 * step
    assert torch.equal(round_to(w, torch.bfloat16).float(), base)  # round to nearest drops it
    stochastic = round_to(w, torch.bfloat16, g).float()
    assert set(stochastic.unique().tolist()) == {1.0, 1.0 + step}
    assert stochastic.mean().item() == pytest.approx(1.0 + 0.3 * step, abs=0.01 * step)
    negative = round_to(-w, torch.bfloat16, g).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 0.3 * step), abs=0.01 * step)


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_hashed_rounding_bits_are_unbiased_and_a_function_of_the_element(fraction):
    """The compiled updates' bits (a hash of key and element index): unbiased rounding, the same bits for an
    element whichever part of its weight it is updated in, other bits under another key."""
    step = 2.0 ** -7
    w = torch.full((500, 400), 1.0 + fraction * step)
    key = torch.tensor([12345, 0])
    rounded = round_with_key(w, torch.bfloat16, key).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + step}
    assert rounded.mean().item() == pytest.approx(1.0 + fraction * step, abs=0.01 * step)
    assert round_with_key(-w, torch.bfloat16, key).float().mean().item() == pytest.approx(-rounded.mean().item())
    bits = hashed_bits(key, w.shape)
    assert bits.min() >= 0 and bits.max() < 1 << 16
    assert torch.equal(hashed_bits(torch.tensor([12345, 300 * 400]), torch.Size([200, 400])), bits[300:])
    assert (hashed_bits(torch.tensor([12346, 0]), w.shape) == bits).float().mean() < 0.001
    assert torch.equal(round_with_key(w, torch.bfloat16, None), round_to(w, torch.bfloat16))  # None: to nearest


def bf16_spacing(w: torch.Tensor) -> torch.Tensor:
    """The distance between neighbouring bf16 values around w (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - 7)


def test_updates_below_bf16_resolution(tiny_bf16, tmp_path):
    # one SGD step with lr 1e-4: lr * grad is below bf16's rounding step for nearly every weight
    lr, key, module = 1e-4, "layers.2.feed_forward.w2.weight", "layers.2"
    before = store_state_dict(prepare_meta(tiny_bf16, tmp_path / "before", log=lambda m: None))
    model = meta_model(tiny_bf16)
    train_in_memory(model, alice(tmp_path / "before"), 1, 4, 1, 32, lr, order="random")
    exact = model.state_dict()[key] - before[key]  # the fp32 update in memory
    below = exact.abs() < 0.25 * bf16_spacing(before[key])
    assert below.float().mean() > 0.99

    after = {}
    for name, kw in {"nearest": dict(rounding="nearest"), "master": dict(master_weights="fp32"),
                     "stochastic": dict(rounding="stochastic")}.items():
        store = prepare_meta(tiny_bf16, tmp_path / name, log=lambda m: None)
        run_finetune(store, steps=1, batch_size=4, seq_len=32, lr=lr, **kw)
        after[name] = Store.open(store)

    # round to nearest: every update below the resolution is lost
    nearest = after["nearest"].read(module)["feed_forward.w2.weight"].float()
    assert torch.equal(nearest[below], before[key][below])
    # an fp32 master copy keeps them: it equals the in-memory fp32 result; the bf16 copy is its rounding
    master = after["master"].read_state(module, "master")["feed_forward.w2.weight"]
    torch.testing.assert_close(master, model.state_dict()[key], rtol=1e-4, atol=1e-9)
    assert torch.equal(after["master"].read(module)["feed_forward.w2.weight"], master.to(torch.bfloat16))
    # stochastic rounding keeps them in expectation: weights move, and on average by the exact update
    moved = after["stochastic"].read(module)["feed_forward.w2.weight"].float() - before[key]
    assert (moved[below] != 0).sum() > 50
    ratio = (moved[below] * exact[below]).sum() / (exact[below] * exact[below]).sum()
    assert 0.5 < ratio < 1.5, ratio


@pytest.mark.parametrize("args, fragments", [
    (("--adam-betas", "0.9,1.0"), ("--adam-betas", "[0, 1)")),
    (("--adam-betas", "-0.1,0.9"), ("--adam-betas",)),
    (("--adam-betas", "0.9"), ("--adam-betas", "two numbers")),
    (("--adam-eps", "0"), ("--adam-eps", "> 0")),
    (("--weight-decay", "-1"), ("--weight-decay",)),
    (("--grad-clip", "-1"), ("--grad-clip",)),
    (("--warmup-steps", "-2"), ("--warmup-steps",)),
])
def test_bad_adamw_flags(store_fp32, args, fragments):
    proc = run_cli("finetune", store_fp32, "--data", ALICE, "--optimizer", "adamw", "--steps", 1, *args)
    assert_one_line_error(proc, *fragments)
    assert Store.open(store_fp32).step == 0
