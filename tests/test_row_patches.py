"""SGD writes back only the embedding rows a step used (row patch files), until a rewrite is cheaper."""

import json

import torch

from slowllama.commands.finetune import finetune
from slowllama.settings import FinetuneSettings

from conftest import ALICE, run_cli
from crashes import files_on_disk, referenced
from reference import assert_state_close, meta_state_dict, store_state_dict
from test_training import reference_model, run_finetune


def embedding_entry(store) -> dict:
    return json.loads((store / "manifest.json").read_text())["files"]["modules"]["tok_embeddings"]


def test_a_step_writes_the_rows_it_used_and_reads_give_the_trained_weights(tiny_fp32, store_fp32, tmp_path):
    base_bytes = embedding_entry(store_fp32)["bytes"]
    run_finetune(store_fp32, steps=1, batch_size=2, seq_len=16, lr=0.05)
    entry = embedding_entry(store_fp32)
    assert entry["file"] == "modules/tok_embeddings@0.safetensors"  # the module file stays
    assert [p["file"] for p in entry["rows"]] == ["modules/tok_embeddings@1.rows.safetensors"]
    assert entry["rows"][0]["bytes"] < base_bytes / 4
    assert files_on_disk(store_fp32) == referenced(store_fp32)
    for steps in (2, 3, 6):  # more steps: patches pile up until rewriting the module is cheaper
        run_finetune(store_fp32, steps=steps, batch_size=2, seq_len=16, lr=0.05)
        entry = embedding_entry(store_fp32)
        assert sum(p["bytes"] for p in entry.get("rows", [])) <= entry["bytes"] // 4
        assert files_on_disk(store_fp32) == referenced(store_fp32)  # replaced patches and files are gone
    assert entry["file"] != "modules/tok_embeddings@0.safetensors"  # it was rewritten at some step
    expected = reference_model(tiny_fp32, store_fp32, 6, 2, 1, 16, 0.05).state_dict()
    assert_state_close(store_state_dict(store_fp32), expected)
    assert run_cli("verify", store_fp32).returncode == 0
    # export reads through the patches too: the exported weights are the trained ones
    run_cli("export", store_fp32, tmp_path / "out", check=0)
    exported = meta_state_dict(tmp_path / "out")
    torch.testing.assert_close(exported["tok_embeddings.weight"], expected["tok_embeddings.weight"], rtol=1e-5,
                               atol=1e-7)


def test_an_altered_row_patch_is_refused(store_fp32):
    run_finetune(store_fp32, steps=1, batch_size=2, seq_len=16, lr=0.05)
    patch = store_fp32 / embedding_entry(store_fp32)["rows"][0]["file"]
    raw = bytearray(patch.read_bytes())
    raw[-1] ^= 0xFF
    patch.write_bytes(bytes(raw))
    proc = run_cli("verify", store_fp32)
    assert proc.returncode != 0 and "tok_embeddings@1.rows.safetensors: checksum mismatch" in proc.stdout + proc.stderr
    proc = run_cli("eval", store_fp32, "--data", ALICE, "--device", "cpu")
    assert proc.returncode != 0 and "tok_embeddings@1.rows.safetensors: checksum mismatch" in proc.stderr


def test_streamed_steps_write_row_patches_too(tiny_fp32, store_fp32):
    # a budget below the model: modules stream, every updated module is written in its step
    logs = []
    finetune(FinetuneSettings(store=str(store_fp32), data=str(ALICE), device="cpu", eval_every=0, steps=2,
                              batch_size=2, seq_len=16, lr=0.05, max_memory="10M"), log=logs.append,
             emit=lambda m: None)
    assert not any("fits in memory" in line for line in logs)
    entry = embedding_entry(store_fp32)
    assert [p["file"] for p in entry["rows"]] == ["modules/tok_embeddings@1.rows.safetensors",
                                                  "modules/tok_embeddings@2.rows.safetensors"]
    assert files_on_disk(store_fp32) == referenced(store_fp32)
    expected = reference_model(tiny_fp32, store_fp32, 2, 2, 1, 16, 0.05).state_dict()
    assert_state_close(store_state_dict(store_fp32), expected)
