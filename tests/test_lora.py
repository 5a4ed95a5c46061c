"""LoRA on an offloaded, read-only base: gradients, training, fuse, the untouched base, bad adapters."""

import hashlib
import json

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.formats.meta import prepare_meta
from slowllama.model.lora import LoRAConfig, LoRALinear, init_params, inject
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.store import safetensors_io as st

from conftest import ALICE, assert_one_line_error, run_cli
from reference import meta_model, store_state_dict, train_adapters_clipped, train_in_memory

quiet = dict(log=lambda m: None, emit=lambda m: None)
TARGET_LIST = "wq,wk,wv,wo,w1,w2,w3"


def run_lora(store, adapters, **kw):
    args = dict(store=str(store), data=str(ALICE), device="cpu", eval_every=0, log_every=0, lora_rank=4,
                lora_alpha=8.0, lora_targets=TARGET_LIST, adapter_path=str(adapters), batch_size=2, seq_len=32)
    return finetune(FinetuneSettings(**{**args, **kw}), **quiet)


def folder_digest(path):
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def in_memory_lora(tiny_fp32, cfg, seed, dropout=0.0):
    model = meta_model(tiny_fp32, dropout=dropout)
    model.requires_grad_(False)
    params = {k: torch.nn.Parameter(v) for k, v in init_params(model.args, cfg, seed, "cpu").items()}
    for i, layer in enumerate(model.layers):
        inject(layer, {k[len(f"layers.{i}."):]: v for k, v in params.items() if k.startswith(f"layers.{i}.")}, cfg)
    return model, params


def test_lora_linear_is_w_plus_scaled_ba():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    layer = LoRALinear(base, a, b, scale=3.0, dropout=0.0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), x @ (base.weight + 3.0 * b @ a).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout,recompute", [(0.1, "auto"), (0.0, "always"), (0.1, "always")])
def test_lora_gradients_equal_in_memory(tiny_fp32, store_fp32, tmp_path, dropout, recompute):
    # one SGD step: the adapters move by exactly -lr * gradient; LoRA's dropout alone also replays its masks
    cfg = LoRAConfig(4, 8.0, 0.1, tuple(TARGET_LIST.split(",")))
    lr = 0.5
    run_lora(store_fp32, tmp_path / "ad", steps=1, lr=lr, optimizer="sgd", lora_dropout=0.1, dropout=dropout, seed=3,
             accumulate=2, recompute=recompute)
    model, params = in_memory_lora(tiny_fp32, cfg, seed=3, dropout=dropout)
    before = {k: v.detach().clone() for k, v in params.items()}
    train_in_memory(model, load_text(ALICE, load_tokenizer(store_fp32)), 1, 2, 2, 32, lr, seed=3, dropout=True,
                    optimizer=torch.optim.SGD(params.values(), lr=lr))
    after = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    for key, p in params.items():
        offloaded_grad = (before[key] - after[key]) / lr
        expected_grad = (before[key] - p.detach()) / lr
        torch.testing.assert_close(offloaded_grad, expected_grad, rtol=1e-5, atol=1e-7, msg=key)
    assert any(after[k].abs().sum() > 0 for k in after if k.endswith("lora_b"))


def test_three_adamw_steps_equal_in_memory_and_base_is_untouched(tiny_fp32, store_fp32, tmp_path):
    cfg = LoRAConfig(4, 8.0, 0.0, tuple(TARGET_LIST.split(",")))
    digest = folder_digest(store_fp32)
    result = run_lora(store_fp32, tmp_path / "ad", steps=3, lr=1e-2, accumulate=2, grad_clip=0.5, save_every=2)
    assert folder_digest(store_fp32) == digest  # the base store: byte-identical
    assert result["bytes_written"] == 0 and result["adapter_bytes_written"] > 0
    model, params = in_memory_lora(tiny_fp32, cfg, seed=0)
    train_adapters_clipped(model, params, load_text(ALICE, load_tokenizer(store_fp32)), 3, 2, 2, 32, 1e-2, 0.5)
    after = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    for key, p in params.items():
        torch.testing.assert_close(after[key], p.detach(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    names = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert {"adapters.safetensors", "slowllama_adapter.json", "adapter_config.json", "adapter_model.safetensors",
            "0000002_adapters.safetensors", "0000003_adapters.safetensors"} <= set(names)
    config = json.loads((tmp_path / "ad" / "slowllama_adapter.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 8.0 and config["targets"] == TARGET_LIST.split(",")
    peft = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())  # PEFT's
    assert peft["r"] == 4 and peft["lora_alpha"] == 8 and peft["peft_type"] == "LORA" and len(peft["target_modules"]) == 7


def test_lora_resume_equals_an_uninterrupted_run(store_fp32, tmp_path):
    run_lora(store_fp32, tmp_path / "straight", steps=4, lr=1e-2, dropout=0.1, lora_dropout=0.1)
    run_lora(store_fp32, tmp_path / "resumed", steps=2, lr=1e-2, dropout=0.1, lora_dropout=0.1)
    run_lora(store_fp32, tmp_path / "resumed", steps=4, lr=1e-2, dropout=0.1, lora_dropout=0.1)
    a = st.read_file(str(tmp_path / "straight" / "adapters.safetensors"))
    b = st.read_file(str(tmp_path / "resumed" / "adapters.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_with_adapter_equals_eval_of_fused_model(store_fp32, tmp_path):
    run_lora(store_fp32, tmp_path / "ad", steps=3, lr=1e-2)
    common = ["--data", ALICE, "--seq-len", 32, "--device", "cpu", "--json"]
    with_adapter = json.loads(run_cli("eval", store_fp32, "--adapter-path", tmp_path / "ad", *common,
                                      check=0).stdout.splitlines()[-1])
    base = json.loads(run_cli("eval", store_fp32, *common, check=0).stdout.splitlines()[-1])
    run_cli("fuse", store_fp32, tmp_path / "fused", "--adapter-path", tmp_path / "ad", check=0)
    run_cli("prepare", tmp_path / "fused", tmp_path / "fused-store", check=0)
    fused = json.loads(run_cli("eval", tmp_path / "fused-store", *common, check=0).stdout.splitlines()[-1])
    assert fused["eval_loss"] == pytest.approx(with_adapter["eval_loss"], rel=1e-5)
    assert with_adapter["eval_loss"] < base["eval_loss"]
    # fused weights are W + (alpha / rank) B A
    adapters = st.read_file(str(tmp_path / "ad" / "adapters.safetensors"))
    w = store_state_dict(store_fp32)["layers.1.feed_forward.w2.weight"]
    merged = store_state_dict(tmp_path / "fused-store")["layers.1.feed_forward.w2.weight"]
    expected = w + 2.0 * adapters["layers.1.feed_forward.w2.lora_b"] @ adapters["layers.1.feed_forward.w2.lora_a"]
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)


def test_generate_with_adapter(store_fp32, tmp_path):
    run_lora(store_fp32, tmp_path / "ad", steps=2, lr=1e-2)
    proc = run_cli("generate", store_fp32, "--adapter-path", tmp_path / "ad", "--prompt", "Alice", "--device", "cpu",
                   "--max-new-tokens", 5, check=0)
    assert proc.stdout.startswith("Alice")


def test_adapter_that_does_not_match_the_store(store_fp32, tmp_path, tiny_fp32):
    from slowllama.formats.tiny import write_tiny
    other = prepare_meta(write_tiny(tmp_path / "other", dtype="fp32", dim=64, n_heads=2, n_kv_heads=1),
                         tmp_path / "other-store", log=lambda m: None)
    run_lora(other, tmp_path / "ad", steps=1, lr=1e-2)
    assert_one_line_error(run_cli("eval", store_fp32, "--adapter-path", tmp_path / "ad", "--data", ALICE),
                          "slowllama_adapter.json", "dim 64")
    # a tampered adapter file: state.json's checksum names it
    run_lora(store_fp32, tmp_path / "ad2", steps=1, lr=1e-2)
    tensors = st.read_file(str(tmp_path / "ad2" / "adapters.safetensors"))
    tensors["layers.0.attention.wq.lora_a"] = torch.zeros(2, 128)
    st.write_file(str(tmp_path / "ad2" / "adapters@1.safetensors"), tensors)
    assert_one_line_error(run_cli("fuse", store_fp32, tmp_path / "f", "--adapter-path", tmp_path / "ad2"),
                          "adapters@1.safetensors", "the manifest says")
    assert not (tmp_path / "f").exists()
    # adapters.safetensors and adapter_config.json alone (copied elsewhere): the first mismatching tensor is named
    (tmp_path / "ad2" / "state.json").unlink()
    st.write_file(str(tmp_path / "ad2" / "adapters.safetensors"), tensors)
    assert_one_line_error(run_cli("fuse", store_fp32, tmp_path / "f", "--adapter-path", tmp_path / "ad2"),
                          "layers.0.attention.wq.lora_a", "shape")
    assert not (tmp_path / "f").exists()
    config = json.loads((tmp_path / "ad2" / "slowllama_adapter.json").read_text())
    (tmp_path / "ad2" / "slowllama_adapter.json").write_text(json.dumps({**config, "targets": ["wq", "zz"]}))
    assert_one_line_error(run_cli("eval", store_fp32, "--adapter-path", tmp_path / "ad2", "--data", ALICE),
                          "--lora-targets", "zz")
    assert_one_line_error(run_cli("eval", store_fp32, "--adapter-path", tmp_path / "nothing", "--data", ALICE),
                          "nothing", "adapter_config.json")


@pytest.mark.parametrize("args, fragments", [
    (("--lora-rank", "4"), ("--adapter-path", "required")),
    (("--lora-rank", "4", "--adapter-path", "AD", "--lora-targets", "wq,bogus"), ("--lora-targets", "bogus")),
    (("--lora-rank", "-1", "--adapter-path", "AD"), ("--lora-rank",)),
    (("--lora-rank", "4", "--adapter-path", "AD", "--lora-alpha", "0"), ("--lora-alpha",)),
    (("--lora-rank", "4", "--adapter-path", "AD", "--lora-dropout", "1"), ("--lora-dropout",)),
])
def test_bad_lora_flags(store_fp32, tmp_path, args, fragments):
    args = [str(tmp_path / "ad") if a == "AD" else a for a in args]
    proc = run_cli("finetune", store_fp32, "--data", ALICE, "--steps", 1, "--log-every", 0, *args)
    assert_one_line_error(proc, *fragments)
