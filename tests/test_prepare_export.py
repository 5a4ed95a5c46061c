"""prepare / export: byte-identical round trips, the store's files, resharding, and streaming memory."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from slowllama.formats.meta import export_meta, prepare_meta
from slowllama.formats.tiny import write_tiny
from slowllama.store.store import Store

from conftest import REPO, run_cli
from reference import meta_state_dict

quiet = dict(log=lambda m: None)


def assert_shards_identical(a_dir, b_dir, n):
    for i in range(n):
        a = torch.load(a_dir / f"consolidated.{i:02d}.pth", weights_only=True)
        b = torch.load(b_dir / f"consolidated.{i:02d}.pth", weights_only=True)
        assert list(a) == list(b), f"shard {i}: key order differs"
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            assert a[key].shape == b[key].shape, key
            assert a[key].contiguous().view(torch.uint8).equal(b[key].contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("store_dtype", [None, "fp32"])
def test_round_trip_is_byte_identical(tiny_bf16, tmp_path, store_dtype):
    # 2 shards, grouped-query attention (4 heads, 2 kv heads), ffn_dim_multiplier 1.3, rope.freqs extra
    params = json.loads((tiny_bf16 / "params.json").read_text())
    assert params["n_kv_heads"] < params["n_heads"] and params["ffn_dim_multiplier"]
    store = prepare_meta(tiny_bf16, tmp_path / "store", dtype=store_dtype, **quiet)
    out = export_meta(store, tmp_path / "out", **quiet)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                    "params.json", "tokenizer.model"]
    assert_shards_identical(tiny_bf16, out, 2)
    assert json.loads((out / "params.json").read_text()) == params
    assert (out / "tokenizer.model").read_bytes() == (tiny_bf16 / "tokenizer.model").read_bytes()


def test_store_layout_and_files_are_plain_safetensors(tiny_bf16, tmp_path):
    store_path = prepare_meta(tiny_bf16, tmp_path / "store", **quiet)
    store = Store.open(store_path)
    names = sorted(store.manifest.files["modules"])
    assert names == sorted(["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "head", "extras"])
    full = meta_state_dict(tiny_bf16)
    for name in names:
        path = store_path / store.manifest.files["modules"][name].file
        with safe_open(str(path), framework="pt") as f:  # the safetensors library reads our files
            for key in f.keys():
                meta_key = key if name in ("head", "extras") else f"{name}.{key}"
                assert torch.equal(f.get_tensor(key).float(), full[meta_key]), meta_key
    assert store.manifest.dtype == "bf16"
    assert store.manifest.source.layout["split_dims"]["tok_embeddings.weight"] == 1
    assert not list(store_path.rglob("*.pth")) and not list(store_path.rglob("*.pkl"))


@pytest.mark.parametrize("shards", [1, 4])
def test_export_to_other_shard_counts(tiny_bf16, tmp_path, shards):
    store = prepare_meta(tiny_bf16, tmp_path / "store", **quiet)
    out = export_meta(store, tmp_path / "out", shards=shards, **quiet)
    assert len(list(out.glob("consolidated.*.pth"))) == shards
    for key, t in meta_state_dict(out).items():
        assert torch.equal(t, meta_state_dict(tiny_bf16)[key]), key
    # and a resharded export prepares back to the same store contents
    again = prepare_meta(out, tmp_path / "again", **quiet)
    a, b = Store.open(store), Store.open(again)
    for name in a.manifest.files["modules"]:
        for key, t in a.read(name).items():
            assert torch.equal(t, b.read(name)[key]), (name, key)


def test_export_dtype_override(tiny_bf16, tmp_path):
    store = prepare_meta(tiny_bf16, tmp_path / "store", **quiet)
    out = export_meta(store, tmp_path / "out", dtype="fp32", **quiet)
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in shard.values()} == {torch.float32}


def test_cli_prepare_export_round_trip(tiny_bf16, tmp_path):
    run_cli("prepare", tiny_bf16, tmp_path / "store", check=0)
    run_cli("export", tmp_path / "store", tmp_path / "out", check=0)
    assert_shards_identical(tiny_bf16, tmp_path / "out", 2)


PEAK_SCRIPT = """
import sys
from pathlib import Path
from slowllama.formats.meta import prepare_meta

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS, after the imports
before = status("VmRSS")
prepare_meta(Path(sys.argv[1]), Path(sys.argv[2]), log=lambda m: None)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prepare_streams_with_about_one_shard_of_memory(tmp_path):
    # a model 8 times larger than one shard: fp32, 8 shards of ~17 MB each, ~135 MB in all
    src = write_tiny(tmp_path / "big", shards=8, dtype="fp32", dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                     multiple_of=64)
    shard = (src / "consolidated.00.pth").stat().st_size
    total = sum(p.stat().st_size for p in src.glob("consolidated.*.pth"))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(tmp_path / "store")],
                         capture_output=True, text=True, check=True, cwd=REPO)
    used = int(out.stdout.strip().splitlines()[-1])
    one_block = 12 * 512 * 512 * 4  # roughly one block in fp32
    assert total > 7 * shard
    assert used < shard + one_block + (24 << 20), (used, shard, total)
