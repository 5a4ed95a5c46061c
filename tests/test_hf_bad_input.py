"""Bad Hugging Face input to prepare / export: one line naming the file or field, nothing half-written."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, run_cli

INDEX = "model.safetensors.index.json"


@pytest.fixture
def src(hf_model, tmp_path):
    folder, _ = hf_model("llama3")
    out = tmp_path / "src"
    shutil.copytree(folder, out)
    return out


def prepare_fails(src, tmp_path, *fragments):
    line = assert_one_line_error(run_cli("prepare", src, tmp_path / "store"), *fragments)
    assert not (tmp_path / "store").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    return line


def edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def shard_of(src, key):
    return src / json.loads((src / INDEX).read_text())["weight_map"][key]


def rewrite_shard(src, key, fn):
    """Apply fn to the state dict of the shard holding `key`, and keep the index in step with it."""
    path = shard_of(src, key)
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f != path.name}
    index["weight_map"].update({k: path.name for k in sd})
    (src / INDEX).write_text(json.dumps(index))


def test_a_folder_that_is_neither_format(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.md").write_text("weights coming soon")
    prepare_fails(tmp_path / "src", tmp_path, "neither a Meta", "params.json", "consolidated.NN.pth",
                  "config.json", "model.safetensors.index.json")


def test_unsupported_architecture(src, tmp_path):
    edit_config(src, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    prepare_fails(src, tmp_path, "config.json", "'Qwen2ForCausalLM' is not supported", "LlamaForCausalLM")


def test_unsupported_rope_scaling_type(src, tmp_path):
    edit_config(src, rope_parameters=None, rope_theta=500000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    prepare_fails(src, tmp_path, "config.json", "rope scaling type 'yarn'", "not supported")


def test_missing_tensor(src, tmp_path):
    rewrite_shard(src, "model.layers.1.mlp.up_proj.weight", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    prepare_fails(src, tmp_path, "'model.layers.1.mlp.up_proj.weight' missing")


def test_unexpected_tensor(src, tmp_path):
    import torch

    key = "model.layers.0.self_attn.q_proj.weight"
    rewrite_shard(src, key, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}))
    prepare_fails(src, tmp_path, shard_of(src, key).name, "unexpected tensor", "model.layers.0.self_attn.q_proj.bias")


def test_tensor_the_index_does_not_know(src, tmp_path):
    path = shard_of(src, "model.norm.weight")
    sd = load_file(str(path))
    sd["model.layers.0.mlp.extra.weight"] = sd["model.norm.weight"].clone()
    save_file(sd, str(path), metadata={"format": "pt"})
    prepare_fails(src, tmp_path, path.name, "model.layers.0.mlp.extra.weight", INDEX)


def test_index_names_a_missing_file(src, tmp_path):
    path = shard_of(src, "model.layers.1.self_attn.o_proj.weight")
    path.unlink()
    prepare_fails(src, tmp_path, INDEX, f"names {path.name}, which is missing")


def test_truncated_shard(src, tmp_path):
    path = shard_of(src, "model.layers.1.self_attn.o_proj.weight")
    path.write_bytes(path.read_bytes()[:-100])
    prepare_fails(src, tmp_path, path.name, "truncated")


def test_no_weights(src, tmp_path):
    for p in src.glob("model*.safetensors*"):
        p.unlink()
    prepare_fails(src, tmp_path, "no model.safetensors or model.safetensors.index.json")


def test_meta_export_of_a_rope_scaling_params_json_cannot_express(hf_model, tmp_path):
    folder, _ = hf_model("llama3.2-tied-128k")  # "llama3" scaling with factor 32: not use_scaled_rope's 8
    run_cli("prepare", folder, tmp_path / "store", check=0)
    assert_one_line_error(run_cli("export", tmp_path / "store", tmp_path / "out", "--format", "meta"),
                          "--format meta", "rope scaling", "--format hf")
    assert not (tmp_path / "out").exists()


def test_tied_checkpoint_whose_lm_head_differs(hf_model, tmp_path):
    import torch

    folder, _ = hf_model("llama3.2-tied-128k")
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    rewrite_shard(src, "model.norm.weight", lambda sd: sd.update({"lm_head.weight": torch.zeros(128256, 32)}))
    prepare_fails(src, tmp_path, "'lm_head.weight' differs from the embeddings", "tie_word_embeddings true")
