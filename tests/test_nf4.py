"""NF4 stores (QLoRA's base): the quantization against a plain reference (and bitsandbytes' where installed),
LoRA on an NF4 store against in-memory training on its dequantized base, the commands that read it, verify,
the bytes it streams, and its bad input."""

import json
import math
import signal

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.engine.residency import train_plan
from slowllama.engine.traffic import key_sizes
from slowllama.formats.convert import prepare
from slowllama.model import nf4
from slowllama.model.lora import LoRAConfig, init_params, inject
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.store import safetensors_io as st
from slowllama.store.quantized import Quantization
from slowllama.store.store import Store
from slowllama.testing.reference import load_transformer

from conftest import ALICE, FAULTS_RUNNER, assert_one_line_error, run_cli
from crashes import ONE_THREAD, in_one_thread
from reference import meta_state_dict, store_state_dict, train_adapters_clipped, train_in_memory

quiet = dict(log=lambda m: None, emit=lambda m: None)


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc
TARGETS = "wq,wk,wv,wo,w1,w2,w3"
SHAPES = [(448, 128), (64, 128), (7, 9), (3, 200), (1, 64 * 257 + 5)]  # last: more than one group of 256 blocks


# ---- the scheme, against a plain reference -------------------------------------------------------------

def reference_dynamic_map():
    """bitsandbytes' signed dynamic 8-bit map, from its description: for exponents 10^-6 .. 10^0 the midpoints of
    2^i + 1 points linspace(0.1, 1), both signs; and 0, 1."""
    values = [0.0, 1.0]
    for i in range(7):
        points = torch.linspace(0.1, 1, 2 ** i + 1)
        mids = (points[:-1] + points[1:]) / 2
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values))


def reference_blockwise(x, block, table):
    """Blocks of `block` values (zero-padded), each divided by its absmax and rounded to the nearest table value
    (argmin: ties go to the lower index): (codes, absmax)."""
    x = torch.cat([x, x.new_zeros(-x.numel() % block)]).view(-1, block)
    absmax = x.abs().max(dim=1).values
    normed = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = (normed[..., None] - table).abs().argmin(dim=-1)
    return codes.reshape(-1), absmax


def reference_quantize(w, double_quant):
    """QLoRA's scheme written out plainly: NF4 codes packed two per byte, first in the high nibble, and the absmax
    per 64 (double quant: the mean subtracted, 8-bit dynamic codes per 256, a fp32 scale each)."""
    codes, absmax = reference_blockwise(w.reshape(-1).float(), 64, torch.tensor(nf4.NF4_VALUES))
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8)
    if not double_quant:
        return [packed, absmax.view(torch.uint8)]
    mean = absmax.mean()
    q, scales = reference_blockwise(absmax - mean, 256, reference_dynamic_map())
    return [packed, scales.view(torch.uint8), mean.reshape(1).view(torch.uint8), q[:absmax.numel()].to(torch.uint8)]


def reference_dequantize(w, double_quant):
    codes, absmax = reference_blockwise(w.reshape(-1).float(), 64, torch.tensor(nf4.NF4_VALUES))
    if double_quant:
        mean = absmax.mean()
        q, scales = reference_blockwise(absmax - mean, 256, reference_dynamic_map())
        absmax = reference_dynamic_map()[q[:absmax.numel()]] * scales.repeat_interleave(256)[:absmax.numel()] + mean
    values = torch.tensor(nf4.NF4_VALUES)[codes].view(-1, 64) * absmax[:, None]
    return values.reshape(-1)[:w.numel()].view(w.shape)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_equal_a_plain_reference(shape, double_quant):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.02
    if w.numel() > 128:
        w.view(-1)[:64] = 0.0  # an all-zero block
    packed = nf4.quantize(w, double_quant)
    assert packed.dtype == torch.uint8 and packed.numel() == nf4.packed_bytes(w.numel(), double_quant)
    assert torch.equal(packed, torch.cat(reference_quantize(w, double_quant)))
    assert torch.equal(nf4.dynamic_map(), reference_dynamic_map())
    out = nf4.dequantize(packed, shape, double_quant)
    assert torch.equal(out, reference_dequantize(w, double_quant))
    # round-trip error: within half the largest gap between NF4 values (-1 to -0.696) times the block's absmax,
    # plus the error of the absmax itself (double quant)
    gap = float(torch.tensor(nf4.NF4_VALUES).diff().max())
    absmax = torch.cat([w.reshape(-1), w.new_zeros(-w.numel() % 64)]).view(-1, 64).abs().max(dim=1).values
    per_block = 0.5 * gap * absmax * 1.001 + (nf4.dequantize_absmax(packed, shape, double_quant) - absmax).abs()
    bound = per_block.repeat_interleave(64)[:w.numel()] + 1e-7
    assert ((out - w).abs().reshape(-1) <= bound).all()
    assert float((out - w).norm() / w.norm()) < 0.12
    assert torch.equal(nf4.dequantize(packed, shape, double_quant, torch.bfloat16), out.to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True])
def test_equal_to_bitsandbytes_where_installed(double_quant):
    functional = pytest.importorskip("bitsandbytes.functional")
    for shape in [s for s in SHAPES if math.prod(s) > 64]:  # (one block: its centered absmax 0/0, a code of no use)
        w = torch.randn(shape) * 0.02
        q, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        ours = nf4.quantize(w, double_quant)
        blocks = math.ceil(w.numel() / 64)
        n = q.numel()  # bitsandbytes keeps no padding: ours codes it as zeros (0x77)
        assert torch.equal(q.reshape(-1), ours[:n]) and bool((ours[n:blocks * 32] == 0x77).all())
        if not double_quant:
            assert torch.equal(state.absmax, ours[blocks * 32:].view(torch.float32))
        else:
            assert torch.equal(state.absmax, ours[-blocks:]) and torch.equal(state.state2.code, nf4.dynamic_map())
        assert torch.equal(functional.dequantize_4bit(q, state), nf4.dequantize(ours, shape, double_quant))


# ---- stores ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nf4_stores(tiny_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4")
    quiet_log = lambda m: None  # noqa: E731
    return {"plain": prepare(tiny_fp32, root / "plain", log=quiet_log),
            "nf4": prepare(tiny_fp32, root / "nf4", quantization=Quantization(), log=quiet_log),
            "dq": prepare(tiny_fp32, root / "dq", quantization=Quantization(double_quant=True), log=quiet_log)}


def test_prepare_stores_the_blocks_linears_as_nf4(nf4_stores):
    plain, store = Store.open(nf4_stores["plain"]), Store.open(nf4_stores["nf4"])
    record = json.loads((store.path / "manifest.json").read_text())["quantization"]
    assert record == {"scheme": "nf4", "block_size": 64, "double_quant": False,
                      "weights": [f"{p}.weight" for p in ("attention.wq", "attention.wk", "attention.wv",
                                                          "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                          "feed_forward.w3")]}
    for name in store.expected_shapes:
        raw, weights, original = store.read(name), store.weights(name), plain.read(name)
        for key, t in original.items():
            if name.startswith("layers.") and key in record["weights"]:
                assert raw[key].dtype == torch.uint8 and torch.equal(raw[key], nf4.quantize(t))
                assert torch.equal(weights[key], nf4.dequantize(raw[key], t.shape))
            else:  # embeddings, norms, the output layer: as they were
                assert torch.equal(raw[key], t) and torch.equal(weights[key], t)
    blocks = [n for n in store.expected_shapes if n.startswith("layers.")]
    ratio = sum(store.module_bytes(n) for n in blocks) / sum(plain.module_bytes(n) for n in blocks)
    assert ratio < 0.15  # of fp32: 4.5 bits of 32 per weight, norms and headers aside


def run_lora(store, adapters, **kw):
    args = dict(store=str(store), data=str(ALICE), device="cpu", eval_every=0, log_every=0, lora_rank=4,
                lora_alpha=8.0, lora_targets=TARGETS, adapter_path=str(adapters), batch_size=2, seq_len=32)
    return finetune(FinetuneSettings(**{**args, **kw}), **quiet)


def dequantized_lora(store, cfg, seed, dropout=0.0):
    """The in-memory reference: the store's dequantized base, frozen, with the adapters injected."""
    model = load_transformer(store, dropout)
    model.requires_grad_(False)
    params = {k: torch.nn.Parameter(v) for k, v in init_params(model.args, cfg, seed, "cpu").items()}
    for i, layer in enumerate(model.layers):
        inject(layer, {k[len(f"layers.{i}."):]: v for k, v in params.items() if k.startswith(f"layers.{i}.")}, cfg)
    return model, params


def test_lora_gradients_equal_in_memory_on_the_dequantized_base(nf4_stores, tmp_path):
    # (one SGD step: the adapters move by exactly -lr * gradient)
    store, lr, unit = nf4_stores["nf4"], 0.5, "block"
    cfg = LoRAConfig(4, 8.0, 0.1, tuple(TARGETS.split(",")))
    run_lora(store, tmp_path / "ad", steps=1, lr=lr, optimizer="sgd", lora_dropout=0.1, dropout=0.1, seed=3,
             accumulate=2, stream_unit=unit)
    model, params = dequantized_lora(store, cfg, seed=3, dropout=0.1)
    before = {k: v.detach().clone() for k, v in params.items()}
    train_in_memory(model, load_text(ALICE, load_tokenizer(store)), 1, 2, 2, 32, lr, seed=3, dropout=True,
                    optimizer=torch.optim.SGD(params.values(), lr=lr))
    after = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    for key, p in params.items():
        torch.testing.assert_close((before[key] - after[key]) / lr, (before[key] - p.detach()) / lr, rtol=1e-5,
                                   atol=1e-7, msg=key)
    assert any(after[k].abs().sum() > 0 for k in after if k.endswith("lora_b"))


@pytest.mark.parametrize("kind, unit", [("nf4", "block"), ("dq", "weight")])
def test_three_adamw_steps_equal_in_memory_and_the_base_is_read_only(nf4_stores, tmp_path, kind, unit):
    store = nf4_stores[kind]
    files = {p.name: p.read_bytes() for p in (store / "modules").iterdir()}
    manifest = (store / "manifest.json").read_bytes()
    result = run_lora(store, tmp_path / "ad", steps=3, lr=1e-2, accumulate=2, grad_clip=0.5, stream_unit=unit)
    assert {p.name: p.read_bytes() for p in (store / "modules").iterdir()} == files
    assert (store / "manifest.json").read_bytes() == manifest and result["bytes_written"] == 0
    model, params = dequantized_lora(store, LoRAConfig(4, 8.0, 0.0, tuple(TARGETS.split(","))), seed=0)
    train_adapters_clipped(model, params, load_text(ALICE, load_tokenizer(store)), 3, 2, 2, 32, 1e-2, 0.5)
    after = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    for key, p in params.items():
        torch.testing.assert_close(after[key], p.detach(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_a_step_reads_the_packed_bytes_and_plans_count_them(nf4_stores, tmp_path, cli):
    reads = {}
    for kind in ("plain", "nf4"):
        store = Store.open(nf4_stores[kind])
        steps = []
        finetune(FinetuneSettings(store=str(store.path), data=str(ALICE), device="cpu", eval_every=0, log_every=0,
                                  lora_rank=4, adapter_path=str(tmp_path / kind), batch_size=2, seq_len=32, steps=1,
                                  stream_unit="weight"),
                 log=lambda m: None, emit=steps.append)
        reads[kind] = steps[-1]["bytes_read"]
        # what plan and residency count of each key is what the store reads for it
        plan = train_plan(store.args, store.state_parts, [], embeddings_backward=False, unit="weight")
        sizes = key_sizes(store.args, store.dtype, plan, None, store.state_part_elements, store.quantization)
        for (k, name), size in sizes.items():  # (a whole module's file: its header too)
            assert size == store.key_bytes(name, k) if "/" in name else 0 < store.key_bytes(name, k) - size < 4096
    assert reads["nf4"] < 0.3 * reads["plain"]
    out = json.loads(ok(cli("plan", nf4_stores["nf4"], "--device", "cpu", "--json")).stdout)
    plain = json.loads(ok(cli("plan", nf4_stores["plain"], "--device", "cpu", "--json")).stdout)
    assert [r["name"] for r in out["configs"]] == ["lora"]
    assert out["configs"][0]["bytes_read"] < 0.3 * next(r for r in plain["configs"] if r["lora"])["bytes_read"]
    # planned before prepare: the plain store's plan with --quantize is the NF4 store's (the files' headers aside)
    ahead = json.loads(ok(cli("plan", nf4_stores["plain"], "--device", "cpu", "--json", "--quantize", "nf4")).stdout)
    assert 0 < out["model"]["store_bytes"] - ahead["model"]["store_bytes"] < 8 * 4096
    assert [r["name"] for r in ahead["configs"]] == ["lora"]
    assert_one_line_error(cli("plan", nf4_stores["plain"], "--double-quant"), "--double-quant")


def test_eval_generate_fuse_and_export_read_the_dequantized_base(nf4_stores, tmp_path, cli):
    store = nf4_stores["dq"]
    run_lora(store, tmp_path / "ad", steps=2, lr=1e-2)
    weights = store_state_dict(store)
    # export: each tensor in its source dtype (fp32 here) by default, or --dtype; as Hugging Face, back again
    ok(cli("export", store, tmp_path / "meta"))
    assert all(torch.equal(t, weights[k]) for k, t in meta_state_dict(tmp_path / "meta").items() if k in weights)
    ok(cli("export", store, tmp_path / "bf16", "--dtype", "bf16"))
    shard = torch.load(tmp_path / "bf16" / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    ok(cli("export", store, tmp_path / "hf", "--format", "hf"))
    ok(cli("prepare", tmp_path / "hf", tmp_path / "hf-store"))
    again = store_state_dict(tmp_path / "hf-store")
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    # eval and generate: the same as on a plain store of the dequantized weights
    ok(cli("prepare", tmp_path / "meta", tmp_path / "plain"))
    common = ["--data", ALICE, "--seq-len", 32, "--device", "cpu", "--json"]

    def loss(*args):
        return json.loads(ok(cli("eval", *args, *common)).stdout.splitlines()[-1])["eval_loss"]
    assert loss(store) == pytest.approx(loss(tmp_path / "plain"), rel=1e-6)
    gen = ["--prompt", "Alice", "--device", "cpu", "--max-new-tokens", 6, "--adapter-path", tmp_path / "ad"]
    assert ok(cli("generate", store, *gen)).stdout == ok(cli("generate", tmp_path / "plain", *gen)).stdout
    # fuse: the dequantized base + (alpha / rank) B A, in the source's format, not quantized
    ok(cli("fuse", store, tmp_path / "fused", "--adapter-path", tmp_path / "ad"))
    ok(cli("prepare", tmp_path / "fused", tmp_path / "fused-store"))
    assert "quantization" not in json.loads((tmp_path / "fused-store" / "manifest.json").read_text())
    adapters = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    merged = store_state_dict(tmp_path / "fused-store")["layers.1.feed_forward.w2.weight"]
    expected = weights["layers.1.feed_forward.w2.weight"] + 2.0 * (adapters["layers.1.feed_forward.w2.lora_b"]
                                                                   @ adapters["layers.1.feed_forward.w2.lora_a"])
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)
    assert loss(tmp_path / "fused-store") == pytest.approx(loss(store, "--adapter-path", tmp_path / "ad"), rel=1e-5)


def test_prepare_of_hugging_face_weights_and_requantizing_is_idempotent(nf4_stores, tmp_path, cli):
    # the dequantized base exported as Hugging Face and prepared again with --quantize nf4: the same bytes (each
    # block's largest value is its absmax again, every other value an NF4 value of it)
    ok(cli("export", nf4_stores["nf4"], tmp_path / "hf", "--format", "hf"))
    ok(cli("prepare", tmp_path / "hf", tmp_path / "again", "--quantize", "nf4"))
    first, again = Store.open(nf4_stores["nf4"]), Store.open(tmp_path / "again")
    assert again.quantization == first.quantization
    for name in first.expected_shapes:
        a, b = first.read(name), again.read(name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_verify_checks_an_nf4_store(nf4_stores, tmp_path, cli):
    for kind in ("nf4", "dq"):
        out = json.loads(ok(cli("verify", nf4_stores[kind], "--json")).stdout.splitlines()[-1])
        assert out["quantization"]["double_quant"] == (kind == "dq")
    # a copy whose packed weight has a NaN scale, its checksum made to match: the scales are checked too
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(nf4_stores["nf4"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["files"]["modules"]["layers.2"]
    tensors = {k: v.clone() for k, v in st.read_file(str(copy / entry["file"])).items()}
    tensors["attention.wk.weight"][-4:] = torch.tensor([float("nan")]).view(torch.uint8)
    (copy / entry["file"]).unlink()
    entry["bytes"], entry["xxh3"] = st.write_file(str(copy / entry["file"]), tensors)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("verify", copy), "layers.2", "attention.wk.weight", "not finite")
    # the manifest's record of the scheme is checked as the store opens
    manifest["quantization"]["scheme"] = "nf3"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("eval", copy, "--data", ALICE), "quantization.scheme", "nf3")


def test_lora_on_nf4_killed_after_a_step_resumes_bit_for_bit(nf4_stores, tmp_path):
    store, args = nf4_stores["nf4"], dict(steps=2, lr=1e-2, dropout=0.1, lora_dropout=0.1)
    in_one_thread(run_lora, store, tmp_path / "straight", **args)
    flags = ["--device", "cpu", "--data", ALICE, "--eval-every", 0, "--log-every", 0, "--lora-rank", 4, "--lora-alpha",
             8.0, "--lora-targets", TARGETS, "--batch-size", 2, "--seq-len", 32, "--steps", 2, "--lr", 1e-2,
             "--dropout", 0.1, "--lora-dropout", 0.1, "--adapter-path", tmp_path / "ad"]
    proc = run_cli("finetune", store, *flags, module=FAULTS_RUNNER,
                   env={**ONE_THREAD, "SLOWLLAMA_FAULTS": "lora.state.after_rename:1"})  # step 1 committed
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    in_one_thread(run_lora, store, tmp_path / "ad", **args)
    a = st.read_file(str(tmp_path / "straight" / "adapters.safetensors"))
    b = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_quantization_input(tiny_fp32, nf4_stores, tmp_path, cli):
    out = tmp_path / "out"
    assert_one_line_error(cli("prepare", tiny_fp32, out, "--quantize", "nf8"), "--quantize", "nf8")
    assert_one_line_error(cli("prepare", tiny_fp32, out, "--double-quant"), "--double-quant", "--quantize")
    assert_one_line_error(cli("prepare", nf4_stores["nf4"], out, "--quantize", "nf4"), "store already")
    hf = tmp_path / "gptq"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    (hf / "model.safetensors").write_bytes(b"")
    assert_one_line_error(cli("prepare", hf, out, "--quantize", "nf4"), "config.json", "quantization_config",
                          "gptq")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    proc = cli("finetune", nf4_stores["nf4"], "--data", ALICE, "--steps", 1, "--device", "cpu")
    assert_one_line_error(proc, "read-only base", "--lora-rank")
    assert not (nf4_stores["nf4"] / "run").exists() and not (nf4_stores["nf4"] / "lock").exists()
