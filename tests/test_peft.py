"""PEFT-format adapters: PEFT loads slowllama's with equal logits, slowllama applies, fuses and trains on PEFT's,
and what cannot be applied exactly is refused in one line."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from slowllama.commands.common import adapter_state
from slowllama.commands.convert import fuse
from slowllama.commands.finetune import finetune
from slowllama.data.windows import eval_batches, load_text
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.formats.convert import export
from slowllama.formats.meta import prepare_meta
from slowllama.formats.tiny import write_tiny
from slowllama.model.lora import LoRAConfig, inject, parse_targets
from slowllama.model.peft import from_peft
from slowllama.model.tokenizer import load_tokenizer
from slowllama.settings import FinetuneSettings
from slowllama.store import safetensors_io as st
from slowllama.store.store import Store
from slowllama.testing.reference import load_transformer

from conftest import ALICE, FAULTS_RUNNER, assert_one_line_error, run_cli
from reference import train_in_memory

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

quiet = dict(log=lambda m: None, emit=lambda m: None)
ALL = "wq,wk,wv,wo,w1,w2,w3"
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_fp32):
    """A tiny fp32 store (GQA: 4 heads, 2 kv heads), its Hugging Face export, and a PEFT adapter of it with
    random A and B on every linear (alpha / r = 1.5)."""
    root = tmp_path_factory.mktemp("peft")
    store = prepare_meta(tiny_fp32, root / "store", log=lambda m: None)
    hf = export(store, root / "hf", format="hf", log=lambda m: None)
    model = get_peft(hf, r=4, alpha=6, targets=HF_ALL, seed=1)
    model.save_pretrained(root / "peft-ad")
    return SimpleNamespace(root=root, store=store, hf=hf, peft_ad=root / "peft-ad", peft_model=model)


def load_hf(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def get_peft(hf, r, alpha, targets, seed, **kw):
    """A PEFT LoRA of the exported model, A and B random (PEFT's B starts at zero, which would test nothing)."""
    model = peft.get_peft_model(load_hf(hf), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                             lora_dropout=0.0, task_type="CAUSAL_LM", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tokens(n=24, batch=2):
    return torch.randint(0, 512, (batch, n), generator=torch.Generator().manual_seed(0))


def slowllama_logits(store, ad, x):
    """Logits of the engine eval and generate run, with the adapters of `ad` as eval reads them."""
    s = Store.open(store)
    lora = adapter_state(s, SimpleNamespace(adapter_path=str(ad)), torch.device("cpu"))
    engine = OffloadedModel(s, EngineConfig(torch.device("cpu"), torch.float32), lora=lora)
    with torch.no_grad():
        return engine.logits(engine.forward_hidden([x], None)[0])


def peft_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def run_lora(store, ad, **kw):
    args = dict(store=str(store), data=str(ALICE), device="cpu", eval_every=0, log_every=0, lora_rank=4,
                lora_alpha=8.0, lora_targets=ALL, adapter_path=str(ad), batch_size=2, seq_len=32)
    return finetune(FinetuneSettings(**{**args, **kw}), **quiet)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- (a) PEFT loads what slowllama trains ---------------------------------------------------------------------
def test_peft_loads_slowllama_adapters_with_equal_logits(world, tmp_path):
    ad = tmp_path / "ad"
    run_lora(world.store, ad, steps=3, lr=3e-2, lora_targets="q_proj,k_proj,wv,wo,gate_proj,w2,w3")  # mixed names
    assert {"adapter_model.safetensors", "adapter_config.json", "slowllama_adapter.json", "state.json",
            "adapters.safetensors"} <= {p.name for p in ad.iterdir()}
    config = json.loads((ad / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["bias"] == "none" and not config["use_rslora"]
    assert sorted(config["target_modules"]) == sorted(HF_ALL)
    assert config["base_model_name_or_path"] == str(world.store.resolve())
    names = set(st.read_file(str(ad / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight" in names
    x = tokens()
    ours = slowllama_logits(world.store, ad, x)
    theirs = peft_logits(peft.PeftModel.from_pretrained(load_hf(world.hf), ad).eval(), x)
    base = peft_logits(load_hf(world.hf), x)
    assert (ours - base).abs().max() > 1e-3  # the adapters changed something
    assert_close(theirs, ours)
    # transformers' own adapter loading reads the same files
    model = load_hf(world.hf)
    model.load_adapter(str(ad))
    assert_close(peft_logits(model.eval(), x), ours)


def test_hf_target_names_and_mixing(world):
    assert parse_targets("q_proj,v_proj") == ("wq", "wv")
    assert parse_targets("wq,q_proj,down_proj,w1") == ("wq", "w2", "w1")
    assert parse_targets("gate_proj,up_proj,o_proj,k_proj") == ("w1", "w3", "wo", "wk")


def test_unknown_target_lists_both_spellings(world, tmp_path, cli):
    err = assert_one_line_error(cli("finetune", world.store, "--data", ALICE, "--lora-rank", 2, "--adapter-path",
                                    tmp_path / "ad", "--lora-targets", "q_proj,qkv_proj", "--steps", 1),
                                "--lora-targets", "qkv_proj")
    assert "wq,wk" in err and "q_proj,k_proj" in err


# ---- (b) slowllama applies what PEFT wrote --------------------------------------------------------------------
def test_slowllama_applies_a_peft_adapter_with_equal_logits(world, tmp_path, cli):
    assert {p.name for p in world.peft_ad.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    x = tokens()
    assert_close(slowllama_logits(world.store, world.peft_ad, x), peft_logits(world.peft_model, x))
    # eval's loss with the PEFT folder equals the loss of PEFT's model on eval's windows
    text = tmp_path / "text.txt"
    text.write_text(ALICE.read_text()[:6000])
    proc = cli("eval", world.store, "--adapter-path", world.peft_ad, "--data", text, "--seq-len", 32, "--json")
    assert proc.returncode == 0, proc.stderr
    total, count = 0.0, 0
    for x, y in eval_batches(load_text(text, load_tokenizer(world.store)), 32, 4):
        total += torch.nn.functional.cross_entropy(peft_logits(world.peft_model, x).flatten(0, 1), y.flatten(),
                                                   reduction="sum").item()
        count += int((y != -100).sum())
    assert json.loads(proc.stdout.splitlines()[-1])["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    proc = cli("generate", world.store, "--adapter-path", world.peft_ad, "--prompt", "Alice", "--max-new-tokens", 3)
    assert proc.returncode == 0 and proc.stdout.startswith("Alice"), proc.stderr


def test_peft_adapter_of_some_targets_with_bf16_weights(world, tmp_path):
    model = get_peft(world.hf, r=3, alpha=5, targets=["k_proj", "up_proj"], seed=2)
    model.save_pretrained(tmp_path / "ad")
    # PEFT saves adapters in the dtype they train in: bf16 weights are read as they are (to fp32)
    tensors = st.read_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    st.write_file(str(tmp_path / "ad" / "adapter_model.safetensors"), {k: v.bfloat16() for k, v in tensors.items()})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.bfloat16().float())
    x = tokens()
    assert_close(slowllama_logits(world.store, tmp_path / "ad", x), peft_logits(model, x))


# ---- (c) training on from a PEFT folder ---------------------------------------------------------------------
def test_finetune_continues_a_peft_adapter(world, tmp_path):
    ad = tmp_path / "ad"
    shutil.copytree(world.peft_ad, ad)
    args = Store.open(world.store).args
    cfg = LoRAConfig(4, 6.0, 0.0, tuple(ALL.split(",")))
    start = from_peft(st.read_file(str(ad / "adapter_model.safetensors")), args, cfg, "peft")
    # the flags' rank and targets are those of a new adapter: the folder's own (r 4, alpha 6, all) win
    run_lora(world.store, ad, steps=1, lr=1e-2, accumulate=2, lora_rank=8, lora_targets="wq,wv")
    run_lora(world.store, ad, steps=2, lr=1e-2, accumulate=2, lora_rank=8, lora_targets="wq,wv")  # resumed
    model = in_memory(world.store, cfg, start)
    opt = torch.optim.AdamW(model.lora_params.values(), lr=1e-2, weight_decay=0.0)
    train_in_memory(model, load_text(ALICE, load_tokenizer(world.store)), 2, 2, 2, 32, 1e-2, optimizer=opt)
    after = st.read_file(str(ad / "adapters.safetensors"))
    assert set(after) == set(model.lora_params)
    for key, p in model.lora_params.items():
        torch.testing.assert_close(after[key], p.detach(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    # and the folder's PEFT files are those adapters, which PEFT loads
    x = tokens()
    assert_close(peft_logits(peft.PeftModel.from_pretrained(load_hf(world.hf), ad).eval(), x),
                 slowllama_logits(world.store, ad, x))
    assert json.loads((ad / "slowllama_adapter.json").read_text())["targets"] == ALL.split(",")


def test_a_peft_folder_killed_in_its_first_save_trains_on_from_peft(world, tmp_path, cli):
    straight, ad = tmp_path / "straight", tmp_path / "ad"
    shutil.copytree(world.peft_ad, straight)
    shutil.copytree(world.peft_ad, ad)
    lora = ["finetune", world.store, "--data", ALICE, "--device", "cpu", "--lora-rank", 2, "--batch-size", 2,
            "--seq-len", 16, "--log-every", 0, "--steps", 2, "--lr", "1e-2"]
    assert cli(*lora, "--adapter-path", straight).returncode == 0
    # slowllama_adapter.json written, then killed before state.json: PEFT's adapters are still the start
    proc = run_cli(*lora, "--adapter-path", ad, module=FAULTS_RUNNER,
                   env={"SLOWLLAMA_FAULTS": "lora.state.before_rename:1"})
    assert proc.returncode != 0 and (ad / "slowllama_adapter.json").is_file() and not (ad / "state.json").exists()
    assert cli(*lora, "--adapter-path", ad).returncode == 0
    a, b = (st.read_file(str(p / "adapters.safetensors")) for p in (straight, ad))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def in_memory(store, cfg, start):
    """The store's model in memory with LoRA on its blocks, starting from the adapters `start`."""
    model = load_transformer(store)
    model.requires_grad_(False)
    model.lora_params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        inject(layer, {k[len(prefix):]: v for k, v in model.lora_params.items() if k.startswith(prefix)}, cfg)
    return model


# ---- (d) fuse from a PEFT folder ----------------------------------------------------------------------------
def test_fuse_of_a_peft_adapter_equals_merge_and_unload(world, tmp_path):
    out = fuse(world.store, tmp_path / "fused", world.peft_ad, format="hf", log=lambda m: None)
    ours = {}
    for f in sorted(out.glob("*.safetensors")):
        ours.update(st.read_file(str(f)))
    model = get_peft(world.hf, r=4, alpha=6, targets=HF_ALL, seed=1)  # the same adapter as world's
    merged = model.merge_and_unload().state_dict()
    assert set(ours) == set(merged)
    for key, t in merged.items():
        torch.testing.assert_close(ours[key], t, rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           load_hf(world.hf).state_dict()["model.layers.0.self_attn.q_proj.weight"])


# ---- older folders, crashes, verify -----------------------------------------------------------------------------
def test_a_folder_of_the_previous_layout_is_read_and_migrated(world, tmp_path, cli):
    ad = tmp_path / "ad"
    run_lora(world.store, ad, steps=1, lr=1e-2)
    x = tokens()
    expected = slowllama_logits(world.store, ad, x)
    # what an older slowllama left: its config in adapter_config.json, no PEFT files, no slowllama_adapter.json
    own = json.loads((ad / "slowllama_adapter.json").read_text())
    del own["base"]
    (ad / "adapter_config.json").write_text(json.dumps(own))
    (ad / "slowllama_adapter.json").unlink()
    (ad / "adapter_model.safetensors").unlink()
    assert_close(slowllama_logits(world.store, ad, x), expected)  # eval reads it as it is
    assert cli("verify", ad).returncode == 0
    assert cli("fuse", world.store, tmp_path / "f", "--adapter-path", ad).returncode == 0
    # the next finetune takes the config to its own file and writes PEFT's at its save
    logs = []
    finetune(FinetuneSettings(store=str(world.store), data=str(ALICE), device="cpu", eval_every=0, log_every=0,
                              lora_rank=4, lora_alpha=8.0, lora_targets=ALL, adapter_path=str(ad), batch_size=2,
                              seq_len=32, steps=2, lr=1e-2), log=logs.append, emit=lambda m: None)
    assert any("slowllama_adapter.json" in m for m in logs), logs
    assert json.loads((ad / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((ad / "slowllama_adapter.json").read_text())["rank"] == 4
    assert_close(peft_logits(peft.PeftModel.from_pretrained(load_hf(world.hf), ad).eval(), x),
                 slowllama_logits(world.store, ad, x))
    assert cli("verify", ad).returncode == 0


def test_peft_files_are_written_and_renewed_with_the_step(world, tmp_path, cli):
    ad = tmp_path / "ad"
    lora = ["finetune", world.store, "--data", ALICE, "--device", "cpu", "--lora-rank", 2, "--lora-targets",
            "q_proj,k_proj", "--adapter-path", ad, "--batch-size", 2, "--seq-len", 16, "--log-every", 0]
    # killed once the step is committed, before its PEFT weights are renamed into place
    proc = run_cli(*lora, "--steps", 1, module=FAULTS_RUNNER, env={"SLOWLLAMA_FAULTS": "lora.save.peft:1"})
    assert proc.returncode != 0 and "state.json" in {p.name for p in ad.iterdir()}
    assert "adapter_model.safetensors" not in {p.name for p in ad.iterdir()}
    assert_one_line_error(cli("verify", ad), "adapter_model.safetensors")
    proc = cli(*lora, "--steps", 1)  # the run is done; opening the folder renews its results
    assert proc.returncode == 0 and "adapter_model.safetensors and adapter_config.json brought up to step 1" \
        in proc.stderr, proc.stderr
    assert cli("verify", ad).returncode == 0
    # a PEFT file altered by hand: verify names it, the next finetune renews it
    tensors = st.read_file(str(ad / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    (ad / "adapter_model.safetensors").unlink()
    st.write_file(str(ad / "adapter_model.safetensors"), tensors)
    assert_one_line_error(cli("verify", ad), "adapter_model.safetensors")
    assert cli(*lora, "--steps", 2).returncode == 0
    assert cli("verify", ad).returncode == 0
    x = tokens()
    assert_close(peft_logits(peft.PeftModel.from_pretrained(load_hf(world.hf), ad).eval(), x),
                 slowllama_logits(world.store, ad, x))


def test_verify_of_a_peft_folder_is_a_one_line_refusal(world, cli):
    assert_one_line_error(cli("verify", world.peft_ad), "PEFT adapter folder")


# ---- (e) what cannot be applied exactly -----------------------------------------------------------------------
def edit_config(ad, **fields):
    c = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**c, **fields}))


def edit_tensors(ad, change):
    path = ad / "adapter_model.safetensors"
    tensors = st.read_file(str(path))
    change(tensors)
    path.unlink()
    st.write_file(str(path), tensors)


KEY = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
BAD = {
    "bias_all": (lambda ad: edit_config(ad, bias="all"), ["bias", "'all'"]),
    "bias_lora_only": (lambda ad: edit_config(ad, bias="lora_only"), ["bias"]),
    "rslora": (lambda ad: edit_config(ad, use_rslora=True), ["use_rslora"]),
    "dora": (lambda ad: edit_config(ad, use_dora=True), ["use_dora"]),
    "modules_to_save": (lambda ad: edit_config(ad, modules_to_save=["lm_head"]), ["modules_to_save"]),
    "rank_pattern": (lambda ad: edit_config(ad, rank_pattern={"q_proj": 8}), ["rank_pattern"]),
    "alpha_pattern": (lambda ad: edit_config(ad, alpha_pattern={"q_proj": 8}), ["alpha_pattern"]),
    "layers_to_transform": (lambda ad: edit_config(ad, layers_to_transform=[0]), ["layers_to_transform"]),
    "pissa": (lambda ad: edit_config(ad, init_lora_weights="pissa"), ["init_lora_weights"]),
    "lm_head_target": (lambda ad: edit_config(ad, target_modules=["q_proj", "lm_head"]), ["'lm_head'", "q_proj"]),
    "regex_targets": (lambda ad: edit_config(ad, target_modules=".*proj"), ["target_modules", "regular"]),
    "ia3": (lambda ad: edit_config(ad, peft_type="IA3"), ["peft_type", "IA3"]),
    "rank_zero": (lambda ad: edit_config(ad, r=0), ["'r'"]),
    "alpha_string": (lambda ad: edit_config(ad, lora_alpha="8"), ["lora_alpha"]),
    "another_rank": (lambda ad: edit_config(ad, r=2), ["lora_A.weight", "shape"]),
    "no_peft_type": (lambda ad: edit_config(ad, peft_type=None), ["peft_type"]),
    "missing_tensor": (lambda ad: edit_tensors(ad, lambda t: t.pop(KEY)), [KEY, "missing"]),
    "renamed_tensor": (lambda ad: edit_tensors(ad, lambda t: t.update({KEY.replace("k_proj", "kk"): t.pop(KEY)})),
                       [KEY, "missing"]),
    "extra_layer": (lambda ad: edit_tensors(ad, lambda t: t.update({KEY.replace("layers.1", "layers.4"): t[KEY]})),
                    ["layers.4", "unexpected", "4 layers"]),
    "fewer_layers": (lambda ad: edit_tensors(ad, lambda t: [t.pop(k) for k in list(t) if ".layers.3." in k]),
                     ["layers.3", "missing"]),
    "wrong_dims": (lambda ad: edit_tensors(ad, lambda t: t.update({KEY: torch.zeros(16, 4)})),
                   [KEY, "shape [16, 4]", "[64, 4]"]),
    "integer_tensor": (lambda ad: edit_tensors(ad, lambda t: t.update({KEY: t[KEY].to(torch.int32)})),
                       [KEY, "dtype"]),
    "not_json": (lambda ad: (ad / "adapter_config.json").write_text("{"), ["adapter_config.json", "JSON"]),
    "no_weights": (lambda ad: (ad / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_peft_adapter_is_refused_in_one_line(world, tmp_path, cli, case):
    ad = tmp_path / "ad"
    shutil.copytree(world.peft_ad, ad)
    change, fragments = BAD[case]
    change(ad)
    err = assert_one_line_error(cli("eval", world.store, "--adapter-path", ad, "--data", ALICE), *fragments)
    assert str(ad) in err


@pytest.mark.parametrize("command", ["fuse", "finetune"])
def test_bad_peft_adapter_is_refused_by_fuse_and_finetune_leaving_the_folder(world, tmp_path, cli, command):
    ad = tmp_path / "ad"
    shutil.copytree(world.peft_ad, ad)
    edit_config(ad, use_dora=True)
    before = {p.name: p.read_bytes() for p in ad.iterdir()}
    argv = {"fuse": ["fuse", world.store, tmp_path / "out", "--adapter-path", ad],
            "finetune": ["finetune", world.store, "--data", ALICE, "--lora-rank", 4, "--adapter-path", ad,
                         "--steps", 1]}[command]
    assert_one_line_error(cli(*argv), "use_dora")
    after = {p.name: p.read_bytes() for p in ad.iterdir() if p.name != "lock"}  # (the lock file stays, empty)
    assert after == before and not (tmp_path / "out").exists()


def test_peft_adapter_of_another_model_is_refused(world, tmp_path, cli):
    other = tmp_path / "other"
    store = prepare_meta(write_tiny(other, dtype="fp32", dim=64, n_heads=2, n_kv_heads=1), tmp_path / "other-store",
                         log=lambda m: None)
    assert_one_line_error(cli("eval", store, "--adapter-path", world.peft_ad, "--data", ALICE),
                          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "shape")
