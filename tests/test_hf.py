"""Hugging Face checkpoints: every architecture against transformers' logits, byte-identical round trips,
exports that transformers loads, tied embeddings through training, Meta <-> HF, the llama3 rope scaling."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from slowllama.errors import SlowllamaError
from slowllama.formats import hf_names as hf
from slowllama.formats.convert import export, prepare
from slowllama.formats.meta import prepare_meta
from slowllama.model.layers import rope_tables
from slowllama.settings import EvalSettings, FinetuneSettings
from slowllama.store.store import Store
from slowllama.testing.reference import load_transformer, store_state_dict

from conftest import ALICE, REPO, run_cli
from hf_models import ARCHS, logits

quiet = dict(log=lambda m: None)


def random_tokens(vocab: int, length: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, min(vocab, 512), (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def assert_folders_identical(a, b):
    names = sorted(p.name for p in a.iterdir())
    added = set()
    if (a / "tokenizer.model").is_file() and not (a / "tokenizer.json").exists():
        # a sentencepiece-only source: export adds tokenizer.json (and its tokenizer_config.json), nothing else
        added = {"tokenizer.json"} | ({"tokenizer_config.json"} - set(names))
    assert sorted(set(names) | added) == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_equal_transformers_and_round_trip_is_byte_identical(name, hf_model, tmp_path):
    folder, model = hf_model(name)
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # sharded, with an index
    notes = []
    store = prepare(folder, tmp_path / "store", log=notes.append)
    args = Store.open(store).args
    x = random_tokens(args.vocab_size)
    assert_close(logits(load_transformer(store), x), logits(model, x))
    # HF -> store -> HF: every shard, the index, config.json, generation_config.json and tokenizer files
    out = export(store, tmp_path / "out", **quiet)
    assert_folders_identical(folder, out)
    if name == "mistral-v0.1-window":  # full attention equals the window up to its length, and no further
        assert args.max_seq_len == 24 and "sliding_window 24" in notes[0]


def test_sliding_window_limits_the_sequence_length(hf_model, tmp_path):
    from slowllama.commands.evaluate import run_eval

    folder, _ = hf_model("mistral-v0.1-window")
    store = prepare(folder, tmp_path / "store", **quiet)
    with pytest.raises(SlowllamaError, match="--seq-len: 32 is above the model's max_seq_len 24"):
        run_eval(EvalSettings(store=str(store), data=str(ALICE), seq_len=32, device="cpu"), **quiet)


def test_eval_equals_transformers_loss_with_a_tokenizer_json(hf_model, tmp_path):
    from tokenizers import Tokenizer

    from slowllama.commands.evaluate import run_eval

    folder, model = hf_model("llama3")
    store = prepare(folder, tmp_path / "store", **quiet)
    text = ALICE.read_text()[:4000]
    (tmp_path / "data.txt").write_text(text)
    got = run_eval(EvalSettings(store=str(store), data=str(tmp_path / "data.txt"), seq_len=32, batch_size=4,
                                device="cpu"), **quiet)
    # eval's definition, computed with the tokenizers library (its post-processor adds BOS) and transformers
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text).ids + [tok.token_to_id("<|end_of_text|>")]
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids[1] != ids[0]
    n = len(ids) // 33
    windows = torch.tensor(ids[: n * 33]).view(n, 33)
    lg = logits(model, windows[:, :-1])
    expected = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), windows[:, 1:].reshape(-1))
    assert got["tokens"] == n * 32
    assert abs(got["eval_loss"] - float(expected)) < 1e-5 * float(expected)


def test_transformers4_config_with_rope_scaling_loads_and_exports_verbatim(hf_model, tmp_path):
    # configs on the Hub carry rope_theta and rope_scaling at the top level (transformers 4's layout)
    folder, model = hf_model("llama3.1")
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (src / "config.json").write_text(json.dumps(config, indent=2))
    store = prepare(src, tmp_path / "store", **quiet)
    assert Store.open(store).args.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    out = export(store, tmp_path / "out", **quiet)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    x = random_tokens(512)
    assert_close(logits(load_hf(out), x), logits(model, x))


def test_resharded_export_loads_in_transformers(hf_model, tmp_path):
    folder, model = hf_model("llama3")
    store = prepare(folder, tmp_path / "store", **quiet)
    run_cli("export", store, tmp_path / "out", "--shards", "3", check=0)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        (tmp_path / "out" / f).stat().st_size - 8 - int.from_bytes((tmp_path / "out" / f).read_bytes()[:8], "little")
        for f in files)
    x = random_tokens(512)
    assert_close(logits(load_hf(tmp_path / "out"), x), logits(model, x))
    # --dtype: the source's files in bf16, with the index and config.json saying so
    out = export(store, tmp_path / "bf16", dtype="bf16", **quiet)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == sum(t.numel() * 2 for t in model.state_dict().values())
    exported, expected = load_hf(out).state_dict(), model.state_dict()
    for key, t in expected.items():
        assert torch.equal(exported[key], t.to(torch.bfloat16).float()), key


def test_tied_checkpoint_that_also_stores_lm_head(hf_model, tmp_path):
    # some tied checkpoints carry lm_head.weight too: accepted as a copy of the embeddings, and written back
    from safetensors.torch import load_file, save_file

    folder, model = hf_model("llama3.2-tied-128k")
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.norm.weight"]
    sd = load_file(str(shard))
    sd["lm_head.weight"] = model.model.embed_tokens.weight.detach().clone()
    save_file(sd, str(shard), metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    store = prepare(src, tmp_path / "store", **quiet)
    assert list(Store.open(store).read("head")) == ["norm.weight"]
    assert_folders_identical(src, export(store, tmp_path / "out", **quiet))


def test_tied_embeddings_stay_tied_through_training_and_export(hf_model, tmp_path):
    from slowllama.commands.finetune import finetune

    folder, model = hf_model("llama3.2-tied-128k")
    store = prepare(folder, tmp_path / "store", **quiet)
    assert list(Store.open(store).read("head")) == ["norm.weight"]
    before = store_state_dict(store)["tok_embeddings.weight"]
    text = tmp_path / "data.txt"
    text.write_text(ALICE.read_text()[:3000])
    finetune(FinetuneSettings(store=str(store), data=str(text), steps=2, batch_size=2, seq_len=16, lr=0.5,
                              eval_every=0, log_every=0, device="cpu"), log=lambda m: None, emit=lambda m: None)
    trained = store_state_dict(store)
    assert not torch.equal(trained["tok_embeddings.weight"], before) and "output.weight" not in trained
    out = export(store, tmp_path / "out", **quiet)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    exported = load_hf(out)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    x = random_tokens(128256)
    assert_close(logits(exported, x), logits(load_transformer(store), x))


def test_meta_store_exports_to_hf_and_back(tiny_fp32, tmp_path):
    store = prepare_meta(tiny_fp32, tmp_path / "store", **quiet)
    out = export(store, tmp_path / "hf", format="hf", **quiet)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == Store.open(store).args.hidden_dim
    x = random_tokens(512)
    assert_close(logits(load_hf(out), x), logits(load_transformer(store), x))
    again = prepare(out, tmp_path / "again", **quiet)
    a, b = store_state_dict(store), store_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_store_exports_to_meta(hf_model, tmp_path):
    folder, model = hf_model("llama2-70b-gqa")
    store = prepare(folder, tmp_path / "store", **quiet)
    out = export(store, tmp_path / "meta", format="meta", shards=2, **quiet)
    params = json.loads((out / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and "tokenizer.model" in {p.name for p in out.iterdir()}
    again = prepare(out, tmp_path / "again", **quiet)
    assert Store.open(again).args.hidden_dim == 352
    x = random_tokens(512)
    assert_close(logits(load_transformer(again), x), logits(model, x))


def test_name_tables_and_rotary_permutation(hf_model):
    from slowllama.formats.tiny import random_state_dict

    _, model = hf_model("llama2-70b-gqa")
    args, _ = hf.args_from_config(model.config.to_dict())
    sd = random_state_dict(args, rope_freqs=False)
    as_hf = hf.meta_to_hf(sd, args)
    assert list(as_hf) != list(sd) and set(as_hf) == set(model.state_dict())
    back = hf.hf_to_meta(as_hf, args)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    wk = sd["layers.0.attention.wk.weight"]  # 2 kv heads of head_dim 16: rows (a0 b0 a1 b1 ...) -> (a0 a1 ... b0 b1 ...)
    assert torch.equal(as_hf["model.layers.0.self_attn.k_proj.weight"][:8], wk[0:16:2])
    with pytest.raises(SlowllamaError, match="unexpected key 'model.layers.0.self_attn.q_proj.bias'"):
        hf.hf_to_meta({**as_hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(3)}, args)
    with pytest.raises(SlowllamaError, match="unexpected key 'model.layers.2.mlp.up_proj.weight'"):
        hf.hf_to_meta({"model.layers.2.mlp.up_proj.weight": torch.zeros(3)}, args)  # only 2 layers


@pytest.mark.parametrize("head_dim,theta,factor,original", [
    (128, 500000.0, 8.0, 8192),  # Llama 3.1
    (64, 500000.0, 32.0, 8192),  # Llama 3.2 1B
    (16, 500000.0, 8.0, 64),  # the tiny test models
])
def test_llama3_rope_scaling_matches_transformers(head_dim, theta, factor, original):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = dict(rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=original)
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, intermediate_size=64, vocab_size=32,
                         num_hidden_layers=1, max_position_embeddings=131072, rope_parameters=rope)
    args, _ = hf.args_from_config(config.to_dict())
    # every band of the scaling occurs: kept (short wavelengths), interpolated, divided by factor (long)
    wavelen = 2 * torch.pi * theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert (wavelen < original / 4).any() and (wavelen > original).any()
    assert ((wavelen >= original / 4) & (wavelen <= original)).any()
    start, length = 5000, 64
    cos, sin = rope_tables(args, start, length)
    position_ids = torch.arange(start, start + length)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), position_ids)
    torch.testing.assert_close(cos, hf_cos[0, :, : head_dim // 2])
    torch.testing.assert_close(sin, hf_sin[0, :, : head_dim // 2])
    plain, _ = rope_tables(dataclasses.replace(args, rope_scaling=None), start, length)
    assert not torch.allclose(cos, plain)  # the scaling did something


PEAK_SCRIPT = """
import sys
from pathlib import Path
from slowllama.formats.convert import export, prepare

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    return status("VmRSS")

before = reset()
prepare(Path(sys.argv[1]), Path(sys.argv[2]), log=lambda m: None)
print(status("VmHWM") - before)
before = reset()
export(Path(sys.argv[2]), Path(sys.argv[3]), log=lambda m: None)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_hf_prepare_and_export_stream_tensor_by_tensor(tmp_path):
    from slowllama.formats.tiny import write_tiny

    # ~100 MB of fp32 weights in shards of at most 16 MiB; a block's largest tensor is ~2.9 MB
    meta = write_tiny(tmp_path / "meta", shards=1, dtype="fp32", dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                      multiple_of=64)
    src = export(prepare_meta(meta, tmp_path / "s0", **quiet), tmp_path / "hf", format="hf",
                 max_shard_size="16M", **quiet)
    shutil.rmtree(tmp_path / "s0")
    shards = list(src.glob("*.safetensors"))
    largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)
    assert total > 6 * largest
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(tmp_path / "store"), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True, cwd=REPO)
    prepare_peak, export_peak = map(int, proc.stdout.split()[-2:])
    tensor = 1408 * 512 * 4
    assert prepare_peak < largest + 2 * tensor + (24 << 20), (prepare_peak, largest, total)
    # export: one tensor at a time, after a checksum pass that reads one module file at a time
    assert export_peak < largest + 2 * tensor + (24 << 20), (export_peak, largest, total)
