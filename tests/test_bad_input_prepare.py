"""Bad input to prepare / export: one line naming the file or field, non-zero exit, nothing half-written."""

import json
import os
import shutil

import pytest
import torch

from slowllama.errors import SlowllamaError
from slowllama.formats.meta import prepare_meta

from conftest import assert_one_line_error, run_cli


@pytest.fixture
def src(tiny_bf16, tmp_path):
    out = tmp_path / "src"
    shutil.copytree(tiny_bf16, out)
    return out


def edit_shard(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "store").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def prepare_fails(src, tmp_path, *fragments):
    line = assert_one_line_error(run_cli("prepare", src, tmp_path / "store"), *fragments)
    assert_nothing_written(tmp_path)
    return line


def test_no_params_json(src, tmp_path):
    (src / "params.json").unlink()
    prepare_fails(src, tmp_path, "params.json")


def test_params_json_not_json(src, tmp_path):
    (src / "params.json").write_text("{dim: 3")
    prepare_fails(src, tmp_path, "params.json", "not valid JSON")


def test_params_json_unknown_field(src, tmp_path):
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "moe_experts": 8}))
    prepare_fails(src, tmp_path, "params.json", "moe_experts")


def test_params_json_wrong_type(src, tmp_path):
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "n_heads": "four"}))
    prepare_fails(src, tmp_path, "params.json", "n_heads")


def test_no_shards(src, tmp_path):
    for p in src.glob("consolidated.*.pth"):
        p.unlink()
    prepare_fails(src, tmp_path, "consolidated")


def test_shards_that_do_not_fit_together(src, tmp_path):
    edit_shard(src / "consolidated.01.pth", lambda sd: sd.update({"layers.1.attention.wq.weight":
                                                                  sd["layers.1.attention.wq.weight"][:-8]}))
    prepare_fails(src, tmp_path, "consolidated.01.pth", "layers.1.attention.wq.weight", "slice")


def test_missing_key(src, tmp_path):
    edit_shard(src / "consolidated.01.pth", lambda sd: sd.pop("layers.2.feed_forward.w2.weight"))
    prepare_fails(src, tmp_path, "consolidated.01.pth", "missing key", "layers.2.feed_forward.w2.weight")


def test_unexpected_key(src, tmp_path):
    edit_shard(src / "consolidated.00.pth", lambda sd: sd.update({"layers.0.attention.bias": torch.zeros(3)}))
    prepare_fails(src, tmp_path, "consolidated.00.pth", "unexpected key", "layers.0.attention.bias")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.model").unlink()
    prepare_fails(src, tmp_path, "tokenizer.model")


def test_tokenizer_not_sentencepiece(src, tmp_path):
    (src / "tokenizer.model").write_bytes(b"this is not a sentencepiece model" * 10)
    prepare_fails(src, tmp_path, "tokenizer.model", "not a sentencepiece model")


def test_vocab_size_that_does_not_match_the_embedding(src, tmp_path):
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "vocab_size": 1000}))
    prepare_fails(src, tmp_path, "vocab_size")


def test_tokenizer_larger_than_the_vocabulary(src, tmp_path, tiny_bf16):
    from slowllama.formats.tiny import write_tiny
    small = write_tiny(tmp_path / "small", vocab_size=400)
    shutil.copyfile(tiny_bf16 / "tokenizer.model", small / "tokenizer.model")  # 512 tokens
    line = assert_one_line_error(run_cli("prepare", small, tmp_path / "store"), "tokenizer", "512", "400")
    assert_nothing_written(tmp_path)


def test_store_exists(src, tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("prepare", src, tmp_path / "store"), "already exists", "--force")
    assert (tmp_path / "store" / "keep.txt").read_text() == "mine"
    # --force replaces only a previous output of the same kind: a store, not a folder of other things
    assert_one_line_error(run_cli("prepare", src, tmp_path / "store", "--force"), "replaces only a slowllama store")
    assert (tmp_path / "store" / "keep.txt").read_text() == "mine"
    run_cli("prepare", src, tmp_path / "new", check=0)
    (tmp_path / "new" / "keep.txt").write_text("old store's")
    run_cli("prepare", src, tmp_path / "new", "--force", check=0)
    assert (tmp_path / "new" / "manifest.json").exists() and not (tmp_path / "new" / "keep.txt").exists()


def test_not_enough_disk(src, tmp_path, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(SlowllamaError, match=r"not enough free disk.*needs .* GiB, 0.00 GiB free"):
        prepare_meta(src, tmp_path / "store", log=lambda m: None)
    assert_nothing_written(tmp_path)


def test_checkpoint_that_runs_code_when_unpickled(src, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    edit_shard(src / "consolidated.01.pth", lambda sd: sd.update({"evil": Payload()}))
    prepare_fails(src, tmp_path, "consolidated.01.pth", "not a plain tensor checkpoint")
    assert not (tmp_path / "pwned").exists()


def test_truncated_shard(src, tmp_path):
    data = (src / "consolidated.01.pth").read_bytes()
    (src / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    prepare_fails(src, tmp_path, "consolidated.01.pth")


def test_source_folder_missing(tmp_path):
    assert_one_line_error(run_cli("prepare", tmp_path / "nope", tmp_path / "store"), "nope")


def test_export_refuses_existing_out_and_leaves_it(src, tmp_path):
    run_cli("prepare", src, tmp_path / "store", check=0)
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_cli("export", tmp_path / "store", tmp_path / "out"), "already exists")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_shards_that_do_not_divide(src, tmp_path):
    run_cli("prepare", src, tmp_path / "store", check=0)
    assert_one_line_error(run_cli("export", tmp_path / "store", tmp_path / "out", "--shards", "3"),
                          "--shards 3", "does not split")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(src, tmp_path):
    (src / "params.json").unlink()
    proc = run_cli("prepare", src, tmp_path / "store", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
