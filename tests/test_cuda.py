"""The engine on a CUDA GPU: the same results as on the CPU, whatever the memory budgets (skipped without cuda)."""

import json

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.engine.residency import staging_bytes, working_bytes
from slowllama.formats.meta import prepare_meta
from slowllama.model.tokenizer import load_tokenizer
from slowllama.optim.adamw import AdamW
from slowllama.settings import FinetuneSettings
from slowllama.store.store import Store

from conftest import ALICE, run_cli
from reference import assert_state_close, meta_model, store_state_dict, train_in_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
quiet = dict(log=lambda m: None, emit=lambda m: None)


def run(store, **kw):
    args = dict(store=str(store), data=str(ALICE), device="cuda", compute_dtype="fp32", eval_every=0, log_every=0,
                steps=3, batch_size=2, accumulate=2, seq_len=32, lr=0.05)
    return finetune(FinetuneSettings(**{**args, **kw}), **quiet)


def tight(store, stateful=False, host: str = "", unit: str = "block") -> dict:
    """A GPU budget just above the working set: nothing stays on the GPU; by default little in host memory
    beyond the pinned buffers of reads and writes in flight (host="1G": modules and activations held in host
    memory, copied over and back each step)."""
    opened = Store.open(store)
    args, parts = opened.args, opened.state_part_elements
    work = working_bytes(args, torch.float32, torch.float32, train=True, optimizer=AdamW() if stateful else None,
                         batch_size=2, seq_len=32, microbatches=2, part_elements=parts, unit=unit)
    staging = staging_bytes(args, torch.float32, AdamW() if stateful else None, False, 2, 2, parts, unit)  # as make_engine counts them
    return dict(max_gpu_memory=str(work + 200_000), max_memory=host or str(staging + 2_000_000), stream_unit=unit)


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("budgets", ["resident", "tight", "host", "eager", "weight", "weight-tight"])
def test_sgd_on_cuda_equals_in_memory_on_cpu(tiny_fp32, tmp_path, budgets):
    store = prepare_meta(tiny_fp32, tmp_path / "s", log=lambda m: None)
    extra = {"resident": {}, "tight": tight(store), "host": tight(store, host="1G"), "eager": {"compile": "off"},
             "weight": {"stream_unit": "weight"}, "weight-tight": tight(store, unit="weight")}
    run(store, **extra[budgets])
    model = meta_model(tiny_fp32)
    train_in_memory(model, load_text(ALICE, load_tokenizer(store)), 3, 2, 2, 32, 0.05)
    assert_state_close(store_state_dict(store), model.state_dict(), rtol=1e-4, atol=1e-6)


def test_adamw_with_dropout_is_the_same_under_any_budget(tiny_fp32, tmp_path):
    a = prepare_meta(tiny_fp32, tmp_path / "a", log=lambda m: None)
    b = prepare_meta(tiny_fp32, tmp_path / "b", log=lambda m: None)
    common = dict(optimizer="adamw", lr=1e-3, dropout=0.1)
    run(a, **common)
    run(b, **common, **tight(b, stateful=True))
    assert_state_close(store_state_dict(b), store_state_dict(a), rtol=1e-5, atol=1e-7)
    c = prepare_meta(tiny_fp32, tmp_path / "c", log=lambda m: None)
    run(c, **common, **tight(c, stateful=True, host="1G"))  # modules, moments and activations in host memory
    assert_state_close(store_state_dict(c), store_state_dict(a), rtol=1e-5, atol=1e-7)
    d = prepare_meta(tiny_fp32, tmp_path / "d", log=lambda m: None)
    with Store.open(d, writable=True, log=lambda m: None) as opened:
        opened.update_manifest({"state_part_elements": 16384})  # moments in flight a part at a time
    run(d, **common, **tight(d, stateful=True))
    assert_state_close(store_state_dict(d), store_state_dict(a), rtol=1e-5, atol=1e-7)
    for host in ("", "1G"):  # streamed by weight, the block's weights and their moments one at a time
        e = prepare_meta(tiny_fp32, tmp_path / f"e{host}", log=lambda m: None)
        run(e, **common, **tight(e, stateful=True, host=host, unit="weight"))
        assert_state_close(store_state_dict(e), store_state_dict(a), rtol=1e-5, atol=1e-7)


def test_bf16_training_lora_eval_and_generation(tiny_bf16, tmp_path):
    store = prepare_meta(tiny_bf16, tmp_path / "s", log=lambda m: None)
    result = finetune(FinetuneSettings(store=str(store), data=str(ALICE), device="cuda", eval_every=0, log_every=0,
                                       steps=20, batch_size=8, seq_len=64, lr=3e-3, optimizer="adamw"), **quiet)
    assert result["loss"] < 5.5 and result["peak_gpu_bytes"] > 0
    lora = finetune(FinetuneSettings(store=str(store), data=str(ALICE), device="cuda", eval_every=0, log_every=0,
                                     steps=5, batch_size=8, seq_len=64, lr=3e-3, lora_rank=4,
                                     adapter_path=str(tmp_path / "ad"), new_run=True), **quiet)
    assert lora["bytes_written"] == 0
    losses = {}
    for device in ("cpu", "cuda"):
        proc = run_cli("eval", store, "--data", ALICE, "--seq-len", 64, "--device", device, "--compute-dtype", "fp32",
                       "--json", check=0)
        losses[device] = json.loads(proc.stdout.splitlines()[-1])["eval_loss"]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
    texts = {d: run_cli("generate", store, "--prompt", "Alice", "--max-new-tokens", 12, "--device", d,
                        "--compute-dtype", "fp32", check=0).stdout for d in ("cpu", "cuda")}
    assert texts["cuda"] == texts["cpu"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_compiled_updates_on_cuda_round_with_the_bits_hashed_on_the_cpu(optimizer):
    """Stochastic rounding's bits hashed inside a compiled update on the GPU (triton's integer arithmetic) are the
    CPU's eager hash, bit for bit: a run rounds alike on either device, and a failed compile's fallback too."""
    from slowllama.engine.compiled import CompiledUpdates
    from slowllama.optim.registry import make_optimizer
    from slowllama.optim.rounding import hashed_bits, round_with_bits

    torch.manual_seed(0)
    w = torch.randn(300, 130).bfloat16()
    g = torch.randn(300, 130).bfloat16() * 1e-2
    noise = torch.tensor([0xDEADBEEF, 11 * 130], dtype=torch.int64)
    opt = make_optimizer(optimizer)
    state = opt.init_state({"w": w})
    scalars = torch.tensor(opt.scalars(1e-3, 1))
    got, _ = CompiledUpdates(opt)(w.cuda(), g.cuda(), torch.tensor(1.0).cuda(), scalars.cuda(),
                                  tuple(state[f"w.{n}"].cuda() for n in opt.state_names), noise.cuda())
    assert torch.equal(hashed_bits(noise.cuda(), w.shape).cpu(), hashed_bits(noise, w.shape))
    w32 = {"w": w.float()}
    opt.update(w32, {"w": g.float()}, state, 1e-3)
    expected = round_with_bits(w32["w"], torch.bfloat16, hashed_bits(noise, w.shape))
    assert (got.cpu() != expected).float().mean() < 0.01  # fp32 order of operations may differ near a boundary
